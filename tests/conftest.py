"""Shared pytest settings."""

import os

from hypothesis import HealthCheck, settings

# CI machines are shared and slow at times: no deadlines, a fixed budget of examples.
settings.register_profile(
    "conveyor",
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("conveyor")
