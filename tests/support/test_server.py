"""The watch on server logs and shared servers (tests/support/server.py) fires on what it
exists to catch, and only once."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import server as support
from tests.support.server import Server, module_server, restarted_if_dead

FAKE_TRACEBACK = ("ERROR conveyor.web: request 1 failed\n"
                  f"{support.TRACEBACK}:\n"
                  '  File "server/web/middleware.py", line 1, in handle\n'
                  "ZeroDivisionError: division by zero\n")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Server]:
    started = Server(tmp_path / "data", fsync="never")
    try:
        yield started
    finally:
        started.kill()


def test_a_traceback_in_a_log_is_reported_once(running: Server) -> None:
    assert support.problems() == []
    with open(running.log, "a") as log:
        log.write(FAKE_TRACEBACK)
    [found] = support.problems()
    assert str(running.log) in found and "ZeroDivisionError" in found
    assert "request 1 failed" in found  # the line that said what failed
    assert support.problems() == []


def test_a_traceback_still_being_written_is_read_whole_later(running: Server) -> None:
    support.problems()
    with open(running.log, "a") as log:
        log.write("ERROR conveyor: boom\nTraceback (most rec")
    assert support.problems() == []
    with open(running.log, "a") as log:
        log.write("ent call last):\nValueError: x\n")
    [found] = support.problems()
    assert "ValueError" in found


def test_a_log_without_a_traceback_is_quiet(running: Server) -> None:
    support.problems()
    running.sqs().create_queue(QueueName="q")  # the server logs as it works
    with open(running.log, "a") as log:
        log.write("WARNING conveyor: request 2 refused: unavailable\n")
    assert support.problems() == []


def test_a_shared_server_that_died_is_reported_and_restarted(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    with module_server(tmp_path_factory, "watched", fsync="never") as shared:
        assert shared.process is not None
        shared.stop(signal.SIGKILL)
        [found] = support.problems()
        assert "died (exit code -9)" in found and shared.url in found
        assert shared.process.poll() is None, "not restarted"
        assert support.problems() == []
        # Dead after that check, between cases: the next case's fixture says so.
        shared.stop(signal.SIGKILL)
        with pytest.raises(pytest.fail.Exception, match="between cases"):
            restarted_if_dead(shared)
        assert shared.process.poll() is None
        assert restarted_if_dead(shared) is shared  # alive: nothing to say
    shared.stop(signal.SIGKILL)
    assert support.problems() == []  # no longer shared: its end is the module's


PARSER_TRACEBACK = (
    "Error handling request from 127.0.0.1\n"
    f"{support.TRACEBACK}:\n"
    '  File "aiohttp/web_protocol.py", line 446, in data_received\n'
    "    messages, upgraded, tail = self._parser.feed_data(data)\n"
    "aiohttp.http_exceptions.BadHttpMessage: 400, message:\n"
    "  Invalid header value char:\n")


def test_the_http_parsers_verdict_on_a_malformed_request_is_expected() -> None:
    """aiohttp answers 400 and logs its parser's exception: no fault of the server's."""
    assert support.unexpected_tracebacks(PARSER_TRACEBACK * 3) == []
    # The same exception after another line, or another exception, is a fault.
    elsewhere = PARSER_TRACEBACK.replace("Error handling request from", "Task failed:")
    assert support.unexpected_tracebacks(elsewhere) == [elsewhere.index(support.TRACEBACK)]
    assert support.unexpected_tracebacks(FAKE_TRACEBACK) == [
        FAKE_TRACEBACK.index(support.TRACEBACK)]
    assert len(support.unexpected_tracebacks(PARSER_TRACEBACK + FAKE_TRACEBACK)) == 1


def test_an_expected_traceback_in_a_log_is_not_reported(running: Server) -> None:
    support.problems()
    with open(running.log, "a") as log:
        log.write(PARSER_TRACEBACK)
    assert support.problems() == []
