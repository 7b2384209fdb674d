#!/usr/bin/env python3
"""SendMessage calls per second, and their latency, from a grpcio client
(Python's gRPC, not written here) against a running kefu.

It opens one conversation per worker over WebSocket, then each worker
calls SendMessage with fresh cids, back to back, for --seconds. Every call
is answered only once its message is durable, so the latency includes the
group commit.

    bench_api.py --addr 127.0.0.1:9201 --admin 127.0.0.1:9202 --key KEY --kefu target/release/kefu --data DIR
"""

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time

import grpc
import websockets

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "business"))
import business  # noqa: E402  (the example's stub loader)


def token(kefu, data, role, sub):
    out = subprocess.run([kefu, "token", "--role", role, "--sub", sub, "--data", data], capture_output=True, text=True, check=True)
    return out.stdout.strip()


async def open_conversations(addr, kefu, data, n):
    convs, sockets = [], []
    for i in range(n):
        ws = await websockets.connect(f"ws://{addr}/ws", subprotocols=["kefu.v1.json"], max_queue=None)
        sockets.append(ws)
        await ws.send(json.dumps({"type": "connect", "id": 1, "token": token(kefu, data, "visitor", f"bench-v{i}")}))
        await ws.send(json.dumps({"type": "open", "id": 2}))
        while True:
            m = json.loads(await ws.recv())
            if m.get("id") == 2:
                convs.append(m["conv"])
                break
    return convs, sockets


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--admin", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--kefu", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    pb = business.load_stubs()
    loop = asyncio.new_event_loop()
    convs, sockets = loop.run_until_complete(open_conversations(args.addr, args.kefu, args.data, args.workers))
    # The visitors stay connected (and so receive every message) for the run.
    threading.Thread(target=lambda: loop.run_until_complete(drain(sockets)), daemon=True).start()
    latencies, errors = [], {}
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def worker(i):
        channel = grpc.insecure_channel(args.admin)
        stub = pb["gateway_grpc"].GatewayStub(channel)
        n, mine = 0, []
        while time.monotonic() < stop_at:
            n += 1
            req = pb["gateway"].SendMessageRequest(conv=convs[i], cid=f"w{i}-{n}", text="order update", sender_name="Shop")
            t0 = time.perf_counter()
            try:
                stub.SendMessage(req, metadata=business.auth(args.key), timeout=10)
                mine.append(time.perf_counter() - t0)
            except grpc.RpcError as e:
                with lock:
                    errors[str(e.code())] = errors.get(str(e.code()), 0) + 1
        with lock:
            latencies.extend(mine)

    started = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = usage.ru_utime + usage.ru_stime - cpu_before
    latencies.sort()
    result = {
        "workers": args.workers,
        "seconds": round(elapsed, 1),
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {p: round(percentile(latencies, q) * 1000, 2) for p, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "errors": errors,
        # Near 1.0 on its pinned core: the client, not kefu, was the limit.
        "client_cpu_cores": round(client_cpu / elapsed, 2),
    }
    print(json.dumps(result))


async def drain(sockets):
    async def one(ws):
        try:
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass

    await asyncio.gather(*(one(ws) for ws in sockets))


if __name__ == "__main__":
    main()
