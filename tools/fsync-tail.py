#!/usr/bin/env python3
"""The fsync tail of a disk alone, at the rate a busy kefu fsyncs its log.

kefu acks and delivers a message once its group commit is durable: one
fdatasync of the write-ahead log per commit, about a thousand a second
at 5,000 msg/s. A single slow fdatasync holds every message in its commit
and behind it, so a disk's fsync tail is a floor under kefu's delivery
tail (BENCHMARKS.md, issue 11, "the 15,000-session tail is the disk's
fsync"). This measures that floor without kefu: it writes --size bytes
at a time into a preallocated file of --file-bytes, in order and wrapping
around as the log does, and fdatasyncs after each write, --rate times a
second (open loop: a slow fsync delays the next ones, it does not slow
the schedule down) for --seconds. Run it on the disk kefu's data would
live on, with nothing else running, before trusting a latency target.

    tools/fsync-tail.py --dir /var/lib/kefu --seconds 300

--mode picks how each write is made durable, so that other ways of
writing a log can be set beside kefu's on the same disk:

- fdatasync (default): a buffered pwrite, then fdatasync; what kefu's
  write-ahead log does. Only the fdatasync is timed.
- direct: an O_DIRECT pwrite of an aligned buffer, then fdatasync; what
  glommio's DmaStreamWriter issues (its files are O_DIRECT, its sync an
  fdatasync). The write and the fdatasync are timed together.
- direct-dsync: an O_DIRECT | O_DSYNC pwrite, durable when it returns,
  no separate sync. Timed alone.
- dsync: a buffered O_DSYNC pwrite. Timed alone.

Prints one JSON line: the mode, fsyncs (durable writes), percentiles and
the maximum in ms, how many took over 10, 100 and 250 ms, and the longest
of each minute.
"""

import argparse
import json
import mmap
import os
import time

# mode: (extra open flags, fdatasync after each write)
MODES = {
    "fdatasync": (0, True),
    "direct": (os.O_DIRECT, True),
    "direct-dsync": (os.O_DIRECT | os.O_DSYNC, False),
    "dsync": (os.O_DSYNC, False),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="a directory on the disk to measure")
    ap.add_argument("--rate", type=float, default=1000, help="fdatasyncs per second (open loop)")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--size", type=int, default=4096, help="bytes written before each fdatasync")
    ap.add_argument("--file-bytes", type=int, default=4 << 20, help="the file's size, written around (kefu's storage.wal_bytes)")
    ap.add_argument("--mode", choices=sorted(MODES), default="fdatasync", help="how each write is made durable")
    args = ap.parse_args()
    flags, sync = MODES[args.mode]
    if args.size % 4096 or args.file_bytes % 4096:
        ap.error("--size and --file-bytes must be multiples of 4096 (O_DIRECT needs aligned writes)")

    path = os.path.join(args.dir, f".fsync-tail-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # Written out, as kefu fills its log: fallocated extents would make
        # each first write a metadata change, and its fdatasync a journal
        # commit, which kefu's log does not pay.
        zeros = b"\0" * (1 << 20)
        for at in range(0, args.file_bytes, len(zeros)):
            os.pwrite(fd, zeros[: min(len(zeros), args.file_bytes - at)], at)
        os.fsync(fd)
        os.close(fd)
        fd = os.open(path, os.O_RDWR | flags)
        # Page-aligned, as O_DIRECT needs.
        block = mmap.mmap(-1, args.size)
        block.write(b"x" * args.size)
        lat_ms, minute_max = [], {}
        start = time.monotonic()
        interval, n, offset = 1 / args.rate, 0, 0
        while True:
            due = start + n * interval
            if due - start >= args.seconds:
                break
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            if offset + args.size > args.file_bytes:
                offset = 0
            t0 = time.monotonic()
            os.pwrite(fd, block, offset)
            if args.mode == "fdatasync":
                # kefu's figure: the buffered write is not the disk's.
                t0 = time.monotonic()
            if sync:
                os.fdatasync(fd)
            offset += args.size
            ms = (time.monotonic() - t0) * 1e3
            lat_ms.append(ms)
            minute = int((t0 - start) // 60)
            minute_max[minute] = max(minute_max.get(minute, 0.0), ms)
            n += 1
    finally:
        os.close(fd)
        os.unlink(path)

    lat_ms.sort()
    pct = lambda q: round(lat_ms[min(len(lat_ms) - 1, int(q * len(lat_ms)))], 3)
    print(json.dumps({
        "dir": args.dir,
        "mode": args.mode,
        "fsyncs": len(lat_ms),
        "rate": args.rate,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": round(lat_ms[-1], 1),
        "over_10ms": sum(1 for x in lat_ms if x > 10),
        "over_100ms": sum(1 for x in lat_ms if x > 100),
        "over_250ms": sum(1 for x in lat_ms if x > 250),
        "max_ms_by_minute": [round(minute_max[m], 1) for m in sorted(minute_max)],
    }))


if __name__ == "__main__":
    main()
