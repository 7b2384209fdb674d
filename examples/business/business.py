#!/usr/bin/env python3
"""An example business system for kefu, in Python with grpcio.

It does what a shop's backend does with a live-chat gateway:

- ``login``: when a user logs in to the shop, it tells kefu who they are
  (``SyncUser``, with their ``vip_level``), so agents see it and routing
  serves VIPs first;
- ``notify``: it tells a customer in their conversation that an order
  shipped (``SendMessage``, with the order number as the ``cid``, so a
  retry never posts it twice) and prints the conversation's last messages
  (``GetHistory``);
- ``serve``: it answers kefu's ``OnConnect`` hook (a known customer gets
  their CRM id on the profile agents see; an account flagged for fraud is
  refused) and ``OnMessage`` hook (a message containing "bug" gets a
  ticket number, posted into the conversation as a bot reply), and
  follows the event stream (``Events.Subscribe``), committing each event
  it has handled, so that after a restart it resumes where it stopped: no
  event lost, none handled twice but the last uncommitted one.

The stubs are generated from the project's own ``proto/`` at start, so
the example always speaks the contract in this checkout.

    python business.py serve --admin 127.0.0.1:9090 --key KEY --listen 127.0.0.1:50051
    python business.py login --admin 127.0.0.1:9090 --key KEY --user v1 --vip 3
    python business.py notify --admin 127.0.0.1:9090 --key KEY --conv c1 --order 1042
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTOS = ["common", "gateway", "events", "hooks"]


def load_stubs():
    """Generates the Python stubs from proto/kefu/v1 into a temporary
    directory and imports them."""
    out = tempfile.mkdtemp(prefix="kefu-pb-")
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    files = [f"kefu/v1/{name}.proto" for name in PROTOS]
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + files) != 0:
        raise SystemExit("protoc could not compile proto/kefu/v1")
    sys.path.insert(0, out)
    mods = {}
    for name in PROTOS:
        mods[name] = importlib.import_module(f"kefu.v1.{name}_pb2")
        if name != "common":
            mods[f"{name}_grpc"] = importlib.import_module(f"kefu.v1.{name}_pb2_grpc")
    return mods


def log(record):
    """One JSON line on stdout per thing done (the CI test reads them)."""
    print(json.dumps(record), flush=True)


def auth(key):
    return (("authorization", f"Bearer {key}"),)


class Hooks:
    """kefu.v1.Hooks: kefu calls these before a session is let in and
    before a message is stored."""

    def __init__(self, pb, first_ticket):
        self.pb = pb
        self.next_ticket = first_ticket
        self.lock = threading.Lock()

    def OnConnect(self, request, context):
        user = request.user
        # The shop's fraud team flags accounts; kefu closes them with 4500.
        if user.id.startswith("fraud-"):
            log({"hook": "OnConnect", "refused": user.id})
            return self.pb["hooks"].OnConnectResponse(refuse=True, reason="account under review")
        # A customer the CRM knows gets its id on the profile agents see;
        # anyone else (an agent, an anonymous visitor) is let in unchanged.
        if user.role == "visitor" and not user.id.startswith("anon-"):
            return self.pb["hooks"].OnConnectResponse(meta={"crm_id": f"CRM-{user.id}"})
        return self.pb["hooks"].OnConnectResponse()

    def OnMessage(self, request, context):
        allow = self.pb["hooks"].OnMessageResponse.ALLOW
        text = request.text if request.HasField("text") else ""
        if "bug" not in text.lower():
            return self.pb["hooks"].OnMessageResponse(action=allow)
        with self.lock:
            ticket = self.next_ticket
            self.next_ticket += 1
        log({"hook": "OnMessage", "conv": request.conv, "cid": request.cid, "ticket": ticket})
        reply = f"Thanks! We opened ticket #{ticket} for this bug."
        return self.pb["hooks"].OnMessageResponse(action=allow, replies=[reply])


def follow_events(pb, admin, key, consumer, stop):
    """Follows the event stream from where this consumer last committed,
    reconnecting when the stream breaks (the gateway restarted, say)."""
    while not stop.is_set():
        try:
            with grpc.insecure_channel(admin) as channel:
                events = pb["events_grpc"].EventsStub(channel)
                stream = events.Subscribe(pb["events"].SubscribeRequest(consumer=consumer, from_offset=0), metadata=auth(key))
                for event in stream:
                    log({"event": event.WhichOneof("kind"), "offset": event.offset})
                    # Handled: commit it, so a restart resumes after it.
                    events.Commit(pb["events"].CommitRequest(consumer=consumer, offset=event.offset), metadata=auth(key))
                    if stop.is_set():
                        return
        except grpc.RpcError as e:
            log({"events": "stream broke", "code": str(e.code())})
        stop.wait(1.0)


def serve(args):
    pb = load_stubs()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb["hooks_grpc"].add_HooksServicer_to_server(Hooks(pb, args.first_ticket), server)
    server.add_insecure_port(args.listen)
    server.start()
    log({"serving": args.listen})
    stop = threading.Event()
    follower = threading.Thread(target=follow_events, args=(pb, args.admin, args.key, args.consumer, stop), daemon=True)
    follower.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop.set()
        server.stop(1)


def login(args):
    """A user logged in to the shop: tell kefu who they are."""
    pb = load_stubs()
    with grpc.insecure_channel(args.admin) as channel:
        gateway = pb["gateway_grpc"].GatewayStub(channel)
        request = pb["gateway"].SyncUserRequest(
            user_id=args.user, role="visitor", name=args.name or args.user, meta={"vip_level": str(args.vip)}
        )
        gateway.SyncUser(request, metadata=auth(args.key), timeout=10)
    log({"synced": args.user, "vip_level": args.vip})


def notify(args):
    """An order shipped: tell the customer in their conversation, once."""
    pb = load_stubs()
    with grpc.insecure_channel(args.admin) as channel:
        gateway = pb["gateway_grpc"].GatewayStub(channel)
        request = pb["gateway"].SendMessageRequest(
            conv=args.conv, cid=f"order-{args.order}-shipped", text=f"Your order {args.order} has shipped.", sender_name="Shop"
        )
        sent = gateway.SendMessage(request, metadata=auth(args.key), timeout=10)
        history = gateway.GetHistory(pb["gateway"].GetHistoryRequest(conv=args.conv, limit=5), metadata=auth(args.key), timeout=10)
    # `from` is a Python keyword: the field is read with getattr.
    last = [{"seq": m.seq, "from": getattr(m, "from").role, "text": m.text} for m in history.messages]
    log({"notified": args.conv, "seq": sent.seq, "duplicate": sent.duplicate, "history": last})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "login", "notify"):
        p = sub.add_parser(name)
        p.add_argument("--admin", default="127.0.0.1:9090", help="kefu's server.admin_listen")
        p.add_argument("--key", default=os.environ.get("KEFU_API_KEY", ""), help="one of kefu's admin.api_keys")
    s = sub.choices["serve"]
    s.add_argument("--listen", default="127.0.0.1:50051", help="where kefu's [hooks] endpoint points")
    s.add_argument("--consumer", default="example-shop", help="the event stream consumer's name")
    s.add_argument("--first-ticket", type=int, default=1000)
    l = sub.choices["login"]
    l.add_argument("--user", required=True)
    l.add_argument("--name", default="")
    l.add_argument("--vip", type=int, default=0)
    n = sub.choices["notify"]
    n.add_argument("--conv", required=True)
    n.add_argument("--order", required=True)
    args = parser.parse_args()
    {"serve": serve, "login": login, "notify": notify}[args.command](args)


if __name__ == "__main__":
    main()
