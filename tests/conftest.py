"""Shared pytest settings, and the check of every server's log after each test."""

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.support import server

# CI machines are shared and slow at times: no deadlines, a fixed budget of examples.
settings.register_profile(
    "conveyor",
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("conveyor")


def _fail_on_server_problems() -> None:
    found = server.problems()
    if found:
        pytest.fail("\n\n".join(found), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A test whose body passed fails if a server logged a traceback or a shared server
    died meanwhile: its clients may see nothing of a crashed background task, or of a case
    that killed the server the next case would quietly restart. Checked as part of the
    call, so that xfail marks a known bug of that kind."""
    result = yield
    _fail_on_server_problems()
    return result


@pytest.fixture(autouse=True)
def _servers_kept_quiet() -> Iterator[None]:
    """The same for what the fixtures' teardown made the servers do (and, after a failed
    test, for what its body made them do: reported besides its failure)."""
    yield
    _fail_on_server_problems()
