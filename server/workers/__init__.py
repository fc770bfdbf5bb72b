"""Every core of one host: ``conveyor serve --workers N``.

A supervisor (:mod:`~server.workers.supervisor`) holds the data directory's lock and
starts N worker processes. Each is a whole FrontEnd listening on the one port
(SO_REUSEPORT: the kernel spreads connections over them), over one shared data
directory. Each partition of each queue is owned by exactly one worker
(:mod:`~server.workers.ownership`), which alone opens and writes its log; a request that
needs a partition another worker owns makes a partition call to it over a Unix socket
(:mod:`~server.workers.mesh`). A standard queue gets one partition per worker, so a send
is taken where it arrives (:mod:`~server.workers.backend`).
"""
