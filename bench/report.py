"""Turn a pytest-benchmark JSON file into records/s and same-run ratios.

    python -m bench.report .benchmarks/latest.json

Each benchmark declares ``extra_info["records"]``, the records one measured call handles.
records/s is that over the mean time of a call: throughput is total records over total
time, and the mean is what carries the periodic costs (a buffer flush every few hundred
calls) that a median would leave out. Ratios compare benchmarks of the same run only,
because the machines are shared and absolute numbers drift between runs; run it a few
times and read the spread.
"""

from __future__ import annotations

import json
import sys

# (engine benchmark, baseline benchmark) pairs whose ratio the table reports.
RATIOS = [
    ("append_batch_never", "baseline_framed_writer"),
    ("append_batch_never", "baseline_queuelib_push"),
    ("append_one_never", "baseline_framed_writer"),
    ("read_view", "baseline_framed_read"),
    ("read_iterate", "baseline_framed_read"),
    ("read_iterate", "baseline_queuelib_pop"),
    ("append_batch_always", "baseline_write_fdatasync"),
    ("ring_lookup", "baseline_dict_get"),
    ("engine_cycle_never", "peer_persistqueue_ack"),
    ("engine_cycle_never", "peer_diskcache_deque"),
    ("engine_cycle_never", "peer_queuelib_fifo"),
    ("engine_cycle_always", "peer_persistqueue_ack"),
]


def rates(path: str) -> dict[str, float]:
    with open(path) as f:
        data = json.load(f)
    out = {}
    for bench in data["benchmarks"]:
        records = bench["extra_info"].get("records", 1)
        out[bench["name"].removeprefix("test_")] = records / bench["stats"]["mean"]
    return out


def interleaved(path: str) -> list[tuple[str, float, float]]:
    """(name, engine records/s, raw records/s) for benchmarks that timed both sides."""
    with open(path) as f:
        data = json.load(f)
    out = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "engine_mean_s" in info:
            records = info["records"]
            out.append((bench["name"].removeprefix("test_"), records / info["engine_mean_s"],
                        records / info["raw_mean_s"]))
    return out


def main(path: str) -> None:
    rate = rates(path)
    print(f"{'benchmark':<40} {'records/s':>14}")
    for name in sorted(rate):
        print(f"{name:<40} {rate[name]:>14,.0f}")
    print()
    print(f"{'ratio':<70} {'x':>6}")
    for engine, baseline in RATIOS:
        for name in sorted(rate):
            if name.split("[")[0] != engine:
                continue
            suffix = name[len(engine):]
            other = baseline + suffix if baseline + suffix in rate else baseline
            if other in rate:
                print(f"{name + ' / ' + other:<70} {rate[name] / rate[other]:>6.2f}")
    if "engine_cycle_always" in rate and "baseline_fdatasync_rate" in rate:
        # Two durable writes per cycle of 10 messages bound the durable message rate.
        bound = rate["baseline_fdatasync_rate"] * 10 / 2
        print(f"{'engine_cycle_always / fdatasync bound (rate * 10 / 2)':<70} "
              f"{rate['engine_cycle_always'] / bound:>6.2f}   (bound {bound:,.0f} msgs/s)")
    for name, engine, raw in interleaved(path):
        print(f"{name + ': engine / raw, alternating calls':<70} {engine / raw:>6.2f}"
              f"   ({engine:,.0f} vs {raw:,.0f} records/s)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".benchmarks/latest.json")
