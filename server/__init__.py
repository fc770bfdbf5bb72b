"""Conveyor's server side: the command line, and (later) the HTTP FrontEnd."""
