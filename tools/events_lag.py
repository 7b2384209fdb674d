#!/usr/bin/env python3
"""Event lag as a client kefu did not write sees it: a grpcio (Python)
subscriber follows kefu.v1.Events/Subscribe from the start of the log and,
for every message event, records its receipt time minus the message's
``ts``. It prints one JSON line per window (``--window`` seconds), so a
long run shows whether the lag holds steady, and a summary line at the
end. It stops after ``--seconds``, or once ``--events`` message events have
come.

    events_lag.py --admin 127.0.0.1:9212 --key KEY --seconds 600 --window 60

``ts`` is stamped by the gateway before the message's group commit and is
whole milliseconds, so each lag includes the commit and is overstated by
up to 1 ms. The subscriber's CPU time is reported, so a reader can tell
when the client, not kefu, was the limit.
"""

import argparse
import json
import os
import resource
import sys
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "business"))
import business  # noqa: E402  (the example's stub loader)


def percentiles(lags):
    lags = sorted(lags)
    if not lags:
        return {}

    def at(q):
        return round(lags[min(len(lags) - 1, int(q * len(lags)))], 2)

    return {"n": len(lags), "p50": at(0.50), "p99": at(0.99), "p999": at(0.999), "max": round(lags[-1], 2)}


def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--admin", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--consumer", default="events-lag-py")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--window", type=float, default=60)
    ap.add_argument("--events", type=int, default=0, help="stop after this many message events (0: no limit)")
    ap.add_argument("--skip", type=int, default=0, help="message events not measured at the start (warm-up)")
    args = ap.parse_args()
    pb = business.load_stubs()
    stub = pb["events_grpc"].EventsStub(grpc.insecure_channel(args.admin))
    req = pb["events"].SubscribeRequest(consumer=args.consumer, from_offset=1)
    stream = stub.Subscribe(req, metadata=business.auth(args.key))
    started = time.monotonic()
    stop_at = started + args.seconds
    window, all_lags, seen, last_offset, gaps = [], [], 0, 0, 0
    window_end = started + args.window
    window_cpu = cpu_s()
    try:
        for event in stream:
            now_ms = time.time() * 1000
            if last_offset and event.offset != last_offset + 1:
                gaps += 1
            last_offset = event.offset
            if event.WhichOneof("kind") == "message":
                seen += 1
                if seen > args.skip:
                    lag = now_ms - event.ts
                    window.append(lag)
                    all_lags.append(lag)
            mono = time.monotonic()
            if mono >= window_end:
                cpu = cpu_s()
                line = {"window_end_s": round(mono - started, 1), "lag_ms": percentiles(window)}
                line["client_cpu_cores"] = round((cpu - window_cpu) / args.window, 3)
                print(json.dumps(line), flush=True)
                window, window_end, window_cpu = [], window_end + args.window, cpu
            if mono >= stop_at or (args.events and seen >= args.events):
                break
    finally:
        stream.cancel()
    elapsed = time.monotonic() - started
    summary = {
        "summary": True,
        "client": "grpcio (Python)",
        "seconds": round(elapsed, 1),
        "message_events": seen,
        "measured": len(all_lags),
        "last_offset": last_offset,
        "offset_gaps": gaps,
        "lag_ms": percentiles(all_lags),
        "client_cpu_cores": round(cpu_s() / elapsed, 3),
    }
    print(json.dumps(summary), flush=True)
    if gaps:
        sys.exit(1)


if __name__ == "__main__":
    main()
