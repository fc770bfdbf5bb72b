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


@pytest.fixture(autouse=True)
def _servers_kept_quiet() -> Iterator[None]:
    """Fail at teardown if a server logged a traceback or a shared server died meanwhile:
    a test's clients may see nothing of a crashed background task, or of a case that
    killed the server the next case quietly restarts."""
    yield
    found = server.problems()
    if found:
        pytest.fail("\n\n".join(found), pytrace=False)
