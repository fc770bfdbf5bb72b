"""HashRing lookups from Python (1,000 keys per measured call)."""

from __future__ import annotations

from engine import HashRing

KEYS = [f"queue-{i}/partition-{i % 7}" for i in range(1000)]


def ring() -> HashRing:
    r = HashRing(vnodes=128)
    for i in range(10):
        r.add(f"node-{i}")
    return r


def test_ring_lookup(benchmark) -> None:
    """HashRing.lookup over 1,000 distinct keys, 10 nodes x 128 vnodes."""
    lookup = ring().lookup

    def run() -> None:
        for key in KEYS:
            lookup(key)

    benchmark.extra_info["records"] = len(KEYS)
    benchmark(run)


def test_ring_preference_list(benchmark) -> None:
    """HashRing.preference_list(key, 3) over 1,000 distinct keys, 10 nodes."""
    preference_list = ring().preference_list

    def run() -> None:
        for key in KEYS:
            preference_list(key, 3)

    benchmark.extra_info["records"] = len(KEYS)
    benchmark(run)


def test_baseline_dict_get(benchmark) -> None:
    """Baseline: a dict.get per key, the cheapest lookup Python has."""
    table = {key: "node" for key in KEYS}
    get = table.get

    def run() -> None:
        for key in KEYS:
            get(key)

    benchmark.extra_info["records"] = len(KEYS)
    benchmark(run)
