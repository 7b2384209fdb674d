#!/usr/bin/env python3
"""Where a long run's threads spent each second: running, waiting for a CPU, or waiting on the disk.

A soak's latency histogram says *that* deliveries stalled (one 323 ms
stall in a 30-minute run, say), not *why*. Sampled once a second from
/proc, for every thread of the given processes (and of any process whose
name is one of --name, found again each second, so a client started
later is picked up):

- ``run_ms``: time on a CPU (schedstat field 1);
- ``wait_ms``: time runnable but not running (schedstat field 2): another
  thread held the CPU, or the host held the vCPU;
- ``blkio_ms``: time blocked on block I/O, an fsync's wait included
  (``delayacct_blkio_ticks``; 0 unless ``kernel.task_delayacct`` is 1,
  which this tool sets when it can and says when it cannot). A disk
  figure only for threads that block in a system call (the storage
  writer): the kernel counts a thread's wait in ``io_uring_enter`` with
  operations in flight as I/O wait too, and for a shard on io_uring the
  figure came out larger than the wall time (42 s a second in one run),
  so it is not read for them;

and for the machine, per CPU state in ms (user, system, idle, iowait,
steal). A second in which a thread was neither running nor waiting for
a CPU nor for the disk was spent asleep: waiting on another thread, a
timer, or the network.

Writes ``threads.tsv`` and ``system.tsv`` into --out until every process
given by --pid is gone (or --seconds pass), then prints the seconds with
the longest waits for a CPU, one JSON line each, for the report.

    tools/thread-sampler.py --pid 1234 --name kefu-bench --out DIR
"""

import argparse
import json
import os
import time

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def pids_named(names):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (read(f"/proc/{entry}/comm") or "").strip() in names:
            found.append(int(entry))
    return found


def thread_counters(pid):
    """{(pid, tid): (name, run_ns, wait_ns, blkio_ticks)} for one process."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        sched, stat = read(f"{base}/schedstat"), read(f"{base}/stat")
        if sched is None or stat is None:
            continue
        run_ns, wait_ns = (int(x) for x in sched.split()[:2])
        # The name is in parentheses and may hold spaces: fields count from after it.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2 :].split()
        blkio = int(rest[39]) if len(rest) > 39 else 0  # field 42 of stat(5)
        out[(pid, int(tid))] = (name, run_ns, wait_ns, blkio)
    return out


def cpu_ticks():
    fields = read("/proc/stat").splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return {"user": user + nice, "system": system + irq + softirq, "idle": idle, "iowait": iowait, "steal": steal}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, action="append", default=[], help="a process to follow (the run ends when all are gone)")
    ap.add_argument("--name", action="append", default=[], help="also follow processes of this name")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=float("inf"))
    ap.add_argument("--top", type=int, default=10, help="seconds to print, by the longest wait for a CPU")
    args = ap.parse_args()

    delayacct = read("/proc/sys/kernel/task_delayacct")
    if delayacct is not None and delayacct.strip() != "1":
        try:
            with open("/proc/sys/kernel/task_delayacct", "w") as f:
                f.write("1")
        except OSError as e:
            print(json.dumps({"warning": f"kernel.task_delayacct stays off ({e}): blkio_ms is 0 throughout"}), flush=True)

    os.makedirs(args.out, exist_ok=True)
    threads = open(os.path.join(args.out, "threads.tsv"), "w")
    system = open(os.path.join(args.out, "system.tsv"), "w")
    threads.write("unix_s\telapsed_s\tpid\ttid\tname\trun_ms\twait_ms\tblkio_ms\n")
    system.write("unix_s\telapsed_s\tuser_ms\tsystem_ms\tidle_ms\tiowait_ms\tsteal_ms\n")

    start = time.monotonic()
    prev_threads, prev_cpu = {}, cpu_ticks()
    worst = []  # (key, unix, elapsed, name, run, wait, blkio)
    while time.monotonic() - start < args.seconds:
        time.sleep(1 - (time.monotonic() - start) % 1)
        elapsed = round(time.monotonic() - start)
        unix = int(time.time())
        pids = [p for p in args.pid if os.path.exists(f"/proc/{p}")]
        if args.pid and not pids:
            break
        now = {}
        for pid in set(pids + pids_named(args.name)):
            now.update(thread_counters(pid))
        for key, (name, run_ns, wait_ns, blkio) in now.items():
            if key not in prev_threads:
                continue
            _, run0, wait0, blkio0 = prev_threads[key]
            run, wait = (run_ns - run0) / 1e6, (wait_ns - wait0) / 1e6
            blk = (blkio - blkio0) * TICK_MS
            if run or wait or blk:
                threads.write(f"{unix}\t{elapsed}\t{key[0]}\t{key[1]}\t{name}\t{run:.1f}\t{wait:.1f}\t{blk:.0f}\n")
            worst.append((wait, unix, elapsed, name, round(run, 1), round(wait, 1), round(blk)))
        cpu = cpu_ticks()
        system.write(
            f"{unix}\t{elapsed}\t" + "\t".join(f"{(cpu[k] - prev_cpu[k]) * TICK_MS:.0f}" for k in ("user", "system", "idle", "iowait", "steal")) + "\n"
        )
        threads.flush()
        system.flush()
        prev_threads, prev_cpu = now, cpu
        worst = sorted(worst, reverse=True)[: args.top]

    for _, unix, elapsed, name, run, wait, blk in worst:
        print(json.dumps({"unix_s": unix, "elapsed_s": elapsed, "thread": name, "run_ms": run, "wait_ms": wait, "blkio_ms": blk}))


if __name__ == "__main__":
    main()
