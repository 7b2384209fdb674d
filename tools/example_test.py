#!/usr/bin/env python3
"""Runs examples/business/business.py against the real kefu binary, the
way a shop would use it, and checks what the issue asks of it:

- it syncs a user with a vip_level, and the agent of that user's open
  conversation sees the meta live;
- it serves OnConnect: a known customer's profile gets its CRM id, and an
  account flagged for fraud is refused (4500);
- it serves OnMessage: a visitor's message containing "bug" gets a ticket
  number back as a bot message;
- it sends idempotently (SendMessage twice with one cid: one message, the
  second answered as a duplicate) and reads history (GetHistory);
- it follows the event stream, commits, and after a restart resumes where
  it stopped: no gap, no loss.

Usage: example_test.py KEFU_BINARY PYTHON (the venv's, with grpcio)
Bounded in time; every process it starts is stopped on the way out.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import websockets

KEFU, PYTHON = sys.argv[1], sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "business", "business.py")
KEY = "example-test-key-0123456789"
DEADLINE = time.monotonic() + 240


def free_ports(n):
    """n distinct free ports: every socket is held until all are bound, so
    the kernel cannot hand out one port twice."""
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def scrape(admin, prefix):
    """The lines of kefu's /metrics that start with prefix (for a failure's
    report; empty if the scrape fails)."""
    try:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
            return [line for line in r.read().decode().splitlines() if line.startswith(prefix)]
    except OSError as e:
        return [f"(scrape failed: {e})"]


def wait_ready(admin):
    end = min(time.monotonic() + 60, DEADLINE)
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("FAIL: kefu never became ready")


class Lines:
    """A child process whose stdout lines (JSON) are collected."""

    def __init__(self, args, env=None):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def records(self):
        out = []
        with self.lock:
            for line in self.lines:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def wait_for(self, what, timeout=30):
        end = min(time.monotonic() + timeout, DEADLINE)
        while time.monotonic() < end:
            found = [r for r in self.records() if what(r)]
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        with self.lock:
            tail = "\n".join(self.lines[-30:])
        raise SystemExit(f"FAIL: timed out waiting; output:\n{tail}")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def token(data, role, sub):
    out = subprocess.run([KEFU, "token", "--role", role, "--sub", sub, "--data", data], capture_output=True, text=True, check=True)
    return out.stdout.strip()


async def call(ws, frame, ids=iter(range(1, 1_000_000))):
    frame = dict(frame, id=next(ids))
    await ws.send(json.dumps(frame))
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if reply.get("id") == frame["id"]:
            return reply


async def until(ws, what, timeout=15):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = json.loads(await asyncio.wait_for(ws.recv(), end - time.monotonic()))
        if what(m):
            return m
    raise SystemExit("FAIL: an expected frame never came")


async def chat(addr, data, admin):
    async with websockets.connect(f"ws://{addr}/ws", subprotocols=["kefu.v1.json"]) as agent, websockets.connect(
        f"ws://{addr}/ws", subprotocols=["kefu.v1.json"]
    ) as visitor:
        assert (await call(agent, {"type": "connect", "token": token(data, "agent", "agent-1")}))["type"] == "connected"
        assert (await call(agent, {"type": "presence", "status": "online"}))["status"] == "online"
        connected = await call(visitor, {"type": "connect", "token": token(data, "visitor", "shopper-1")})
        assert connected["type"] == "connected", connected
        # OnConnect: the CRM's id is on the profile.
        assert connected["user"]["meta"].get("crm_id") == "CRM-shopper-1", connected
        print(f"ok: OnConnect enriched the visitor: {connected['user']}")
        conv = (await call(visitor, {"type": "open"}))["conv"]

        # The shop's login: SyncUser with a vip_level; the agent sees it live.
        subprocess.run([PYTHON, EXAMPLE, "login", "--admin", admin, "--key", KEY, "--user", "shopper-1", "--vip", "3"], check=True, timeout=60)
        pushed = await until(agent, lambda m: m.get("type") == "conversation" and m.get("visitor", {}).get("meta", {}).get("vip_level") == "3")
        print(f"ok: SyncUser reached the agent: {pushed['visitor']}")

        # A bug report gets a ticket from the OnMessage hook.
        ack = await call(visitor, {"type": "send", "conv": conv, "cid": "m1", "text": "I found a bug in checkout"})
        assert ack["type"] == "ack", ack
        bot = await until(visitor, lambda m: m.get("type") == "msg" and m["from"]["role"] == "bot")
        assert "#1000" in bot["text"], bot
        print(f"ok: OnMessage answered with {bot['text']!r}")
        for i in range(5):
            await call(visitor, {"type": "send", "conv": conv, "cid": f"more-{i}", "text": f"message {i}"})

        # SendMessage is idempotent by cid; GetHistory shows it once.
        first = notify(admin, conv, "1042")
        again = notify(admin, conv, "1042")
        assert not first["duplicate"] and again["duplicate"] and again["seq"] == first["seq"], (first, again)
        shipped = [m for m in again["history"] if "1042" in m["text"]]
        assert len(shipped) == 1 and shipped[0]["from"] == "bot", again["history"]
        pushed = await until(visitor, lambda m: m.get("type") == "msg" and "1042" in (m.get("text") or ""))
        print(f"ok: SendMessage once, resent as a duplicate of seq {first['seq']}; the visitor got {pushed['text']!r}")

    # OnConnect refuses an account the shop flagged: unauthorized, close 4500.
    async with websockets.connect(f"ws://{addr}/ws", subprotocols=["kefu.v1.json"]) as fraud:
        refused = await call(fraud, {"type": "connect", "token": token(data, "visitor", "fraud-7")})
        assert refused.get("code") == "unauthorized" and "under review" in refused.get("message", ""), refused
        try:
            await asyncio.wait_for(fraud.recv(), 10)
        except websockets.ConnectionClosed as e:
            assert e.rcvd is not None and e.rcvd.code == 4500, e
        else:
            raise SystemExit("FAIL: a refused connect was not closed")
        print("ok: OnConnect refused a flagged account (4500)")
    return conv


def notify(admin, conv, order):
    out = subprocess.run(
        [PYTHON, EXAMPLE, "notify", "--admin", admin, "--key", KEY, "--conv", conv, "--order", order],
        check=True, timeout=60, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    data = tempfile.mkdtemp(prefix="kefu-example-")
    addr, admin, hooks = (f"127.0.0.1:{p}" for p in free_ports(3))
    # The hooks' 1 s default is a latency budget; this test checks what the
    # hooks do, on a debug build, on a CI machine that may be busy (a first
    # OnConnect past 1 s once let a visitor in unenriched, as
    # hooks.failure = "open" says). "open" stays: the example is killed
    # below and a visitor connects meanwhile. A failure prints kefu's log
    # (a failed hook call is logged) and its hook counts.
    env = dict(
        os.environ,
        KEFU_ADMIN_API_KEYS=json.dumps([KEY]),
        KEFU_HOOKS_ENDPOINT=f"http://{hooks}",
        KEFU_HOOKS_ON_MESSAGE="true",
        KEFU_HOOKS_ON_CONNECT="true",
        KEFU_HOOKS_TIMEOUT_MS="15000",
    )
    example = Lines([PYTHON, EXAMPLE, "serve", "--admin", admin, "--key", KEY, "--listen", hooks])
    kefu = Lines([KEFU, "serve", "--listen", addr, "--admin-listen", admin, "--data", data], env=env)
    try:
        example.wait_for(lambda r: "serving" in r)
        wait_ready(admin)
        asyncio.run(chat(addr, data, admin))

        # The follower has seen and committed events; stop it mid-stream,
        # make more, start it again: it resumes after its last commit.
        seen = example.wait_for(lambda r: "event" in r and r.get("offset", 0) >= 10)
        example.stop(signal.SIGKILL)
        first = [r["offset"] for r in example.records() if "event" in r]
        asyncio.run(more(addr, data))
        example = Lines([PYTHON, EXAMPLE, "serve", "--admin", admin, "--key", KEY, "--listen", hooks])
        example.wait_for(lambda r: "event" in r and r["offset"] > max(first) + 3)
        second = [r["offset"] for r in example.records() if "event" in r]
        assert second[0] <= max(first) + 1, f"a gap after the restart: {max(first)} then {second[0]}"
        assert second[0] >= max(first), f"resumed before its last commit: {max(first)} then {second[0]}"
        offsets = sorted(set(first + second))
        assert offsets == list(range(offsets[0], offsets[-1] + 1)), f"gaps in {offsets}"
        print(f"ok: events {first[0]}..{max(first)}, restart, then {second[0]}..{max(second)}: no gap, no loss")
        del seen
    except BaseException:
        # What the two processes said, and how kefu counted its hook calls.
        for name, proc in (("kefu", kefu), ("example", example)):
            with proc.lock:
                tail = "\n".join(proc.lines[-40:])
            print(f"--- {name}'s last output:\n{tail}", file=sys.stderr)
        print("--- kefu's hook metrics:\n" + "\n".join(scrape(admin, "kefu_hook_")), file=sys.stderr)
        raise
    finally:
        example.stop()
        kefu.stop()
    print("example: all checks passed")


async def more(addr, data):
    async with websockets.connect(f"ws://{addr}/ws", subprotocols=["kefu.v1.json"]) as v:
        await call(v, {"type": "connect", "token": token(data, "visitor", "shopper-2")})
        conv = (await call(v, {"type": "open"}))["conv"]
        for i in range(5):
            await call(v, {"type": "send", "conv": conv, "cid": f"after-{i}", "text": "hello"})


if __name__ == "__main__":
    main()
