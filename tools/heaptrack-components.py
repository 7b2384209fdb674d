#!/usr/bin/env python3
"""Heap held per session, by component, from a heaptrack profile of kefu.

Issue 11, item 5: where a connected chat session's bytes go. The method:

  1. build kefu with the system allocator (heaptrack sees malloc, not
     mimalloc): in gateway/src/main.rs, `Counting<std::alloc::System>` and
     `Counting(std::alloc::System)` for the `mimalloc::MiMalloc` ones, then
     `cargo build --release --bin kefu` (do not commit that edit);
  2. run it under `heaptrack -o OUT kefu serve ...`, connect the sessions
     (kefu-bench chat, as tools/bench-session-memory.sh does), stop it with
     SIGTERM;
  3. heaptrack_print -f OUT.zst -F OUT.flame --flamegraph-cost-type peak
     --print-peaks 0 --print-allocators 0 --print-temporary 0
     --print-leaks 0 --print-histogram 0 --print-massif 0
  4. tools/heaptrack-components.py OUT.flame SESSIONS

Each stack's peak bytes go to the first component whose pattern matches
its innermost three kefu frames (c++filt demangles them). The cost is the
peak of each allocation site, not a snapshot: a site whose memory is freed
before the sessions are all up (a drained outbound queue) shows its
highest point. Startup allocations (mailboxes, slab, storage) are listed
apart; they do not grow with sessions.
"""

import collections
import re
import subprocess
import sys

COMPONENTS = [
    ("connection task (monoio task + future)", r"^kefu_gateway::shard::accept_loop"),
    (
        "startup: mailboxes, slab, storage open, runtime",
        r"Mailbox.*::new|Slab::new|Class::new|Shared::new|Store::open_with|open_database|server::start$"
        r"|bridge::runtime|call_init|Rules::new|Config|PerIpLimiter::new|ShardStats::new"
        r"|shard::run <- kefu_gateway::server",
    ),
    ("connection: outbound queue storage", r"^kefu_gateway::conn::(Conn::push|flush|queue_forced)"),
    (
        "connection: Rc<Conn>, registry, io ops",
        r"^kefu_gateway::conn::(serve|run)|^kefu_gateway::shard::Shard::register"
        r"|^kefu_gateway::conn::upgrade|^kefu_gateway::shard::serve",
    ),
    (
        "edge session (Sess in the edge map)",
        r"^kefu_core::chat::edge::Edge::handle_client_frame <- kefu_core::chat::edge::Edge::on_connect",
    ),
    ("identity strings (anonymous id, name)", r"anonymous_id|anonymous_identity|into_identity"),
    ("rate limiter / session check", r"^kefu_core::session::Session::check"),
    ("home: conversation map", r"^kefu_core::chat::home::Home::handle_change"),
    ("home: cid window (recent sends)", r"Conversation::send|Conversation::remember"),
    ("directory replicas (every shard)", r"Directory::add"),
    ("router: conversation entries, by-visitor, queue", r"routing::Router::(open|assign|finish)"),
    ("router: visitor devices", r"visitor_connected"),
    ("router: agents", r"agent_connected|Presence::connect"),
    ("storage writer (redb page cache of what was written)", r"kefu_storage::group_commit"),
    (
        "frames in flight, pools",
        r"FramePool|ChatService|Outbox|Edge::announce|Home::handle_committed|flush_local|sweep|spare",
    ),
]


def clean(name: str) -> str:
    name = re.sub(r"\[[0-9a-f]+\]", "", name)
    return re.sub(r"::h[0-9a-f]{16}$", "", name)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, sessions = sys.argv[1], int(sys.argv[2])
    stacks = []
    names = set()
    for line in open(path):
        frames, _, cost = line.rstrip("\n").rpartition(" ")
        stack = frames.split(";")
        stacks.append((stack, int(cost)))
        names.update(stack)
    names = sorted(names)
    demangled = subprocess.run(
        ["c++filt"], input="\n".join(n.split(" (")[0] for n in names), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    readable = {n: clean(d) for n, d in zip(names, demangled)}
    totals = collections.Counter()
    unmatched = collections.Counter()
    for stack, cost in stacks:
        kefu = [
            readable[f]
            for f in stack
            if re.search(r"kefu_(core|gateway|storage|proto)", readable[f]) and "Counting" not in readable[f]
        ]
        key = " <- ".join(kefu[::-1][:3])
        for name, pattern in COMPONENTS:
            if key and re.search(pattern, key):
                totals[name] += cost
                break
        else:
            totals["other"] += cost
            unmatched[key[:160] or "(no kefu frame)"] += cost
    print(f"total of the sites' peaks: {sum(totals.values())} B")
    print(f"| component | peak bytes | per session ({sessions}) |")
    print("| --- | ---: | ---: |")
    for name, cost in totals.most_common():
        print(f"| {name} | {cost} | {cost / sessions:.0f} |")
    for key, cost in unmatched.most_common(5):
        print(f"other: {cost} B from {key}", file=sys.stderr)


if __name__ == "__main__":
    main()
