#!/usr/bin/env python3
"""How often this machine takes a CPU away from a running thread, and for how long.

Spins on one CPU reading the monotonic clock and counts every gap between
two reads of at least --min-us: time the thread was runnable but did not
run (the hypervisor descheduling the vCPU, interrupts, other threads).
Run it on an idle core to see what the host alone costs a latency figure:
a gap of 20 ms delays every message in flight on that core by up to that
much, whatever the program.

    taskset -c 1 tools/hiccup.py --seconds 60

Prints one JSON line: gaps per second at each threshold, the share of
wall time spent in gaps, the longest gap, and the steal ticks the kernel
counted for the CPU meanwhile (a nested or paravirtual guest may report
none even when it is descheduled).
"""

import argparse
import json
import os
import time

THRESHOLDS_US = [200, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000]


def steal_ticks(cpu):
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields[0] == f"cpu{cpu}":
                return int(fields[8])
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--min-us", type=int, default=200)
    args = p.parse_args()
    if args.seconds <= 0 or args.min_us <= 0:
        p.error("--seconds and --min-us must be positive")
    # A gap under --min-us is not looked at, so no threshold below it can
    # be counted.
    thresholds = [t for t in THRESHOLDS_US if t >= args.min_us] or [args.min_us]

    cpus = os.sched_getaffinity(0)
    cpu = min(cpus) if len(cpus) == 1 else None
    steal_before = steal_ticks(cpu) if cpu is not None else None
    clock = time.perf_counter_ns
    min_ns = args.min_us * 1_000
    counts = [0] * len(thresholds)
    lost_ns = 0
    longest_ns = 0
    start = prev = clock()
    end = start + int(args.seconds * 1e9)
    while prev < end:
        now = clock()
        gap = now - prev
        if gap >= min_ns:
            lost_ns += gap
            longest_ns = max(longest_ns, gap)
            for i, t in enumerate(thresholds):
                if gap >= t * 1_000:
                    counts[i] += 1
        prev = now
    wall = (prev - start) / 1e9
    out = {
        "cpu": cpu,
        "seconds": round(wall, 1),
        "gaps_per_s": {f">={t}us": round(c / wall, 2) for t, c in zip(thresholds, counts)},
        "gaps": {f">={t}us": c for t, c in zip(thresholds, counts)},
        # Of gaps of at least --min-us.
        "share_of_time_in_gaps": round(lost_ns / max(prev - start, 1), 5),
        "longest_gap_ms": round(longest_ns / 1e6, 2),
    }
    if steal_before is not None:
        out["steal_ticks"] = steal_ticks(cpu) - steal_before
    print(json.dumps(out))


if __name__ == "__main__":
    main()
