//! What one dequeue costs with a long queue: an agent accepts the first of
//! 50,000 waiting conversations, in the router alone ([`kefu_core::routing`])
//! and in the router machine that turns its decisions into posts
//! ([`kefu_core::chat::router`]).
//!
//! Positions that a dequeue moves are announced by the next tick, all
//! together (`routing.position_update_ms`): `*/tick_50k` is that tick after
//! one dequeue, 49,999 positions told (the router's actions; the machine's
//! one post per shard). Before ticks, the dequeue itself announced them.
//!
//! Run: `cargo bench -p kefu-core --bench routing`. Each timed step starts
//! from the same state: the untimed part of an iteration closes the
//! conversation just accepted and opens a new one at the back of the queue,
//! so the queue stays at 50,000.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use kefu_core::chat::router::Router as Machine;
use kefu_core::chat::{Reply, SessionAddr};
use kefu_core::config::{CoreConfig, RoutingConfig};
use kefu_core::identity::{Actor, GroupName, Identity, Meta, UserId, Visitor};
use kefu_core::routing::{AgentInfo, OpenRequest, Router};
use kefu_core::session::RouteRequest;
use kefu_proto::client::Codec;
use kefu_proto::{ConvId, PresenceStatus, Role};

const WAITING: usize = 50_000;
const T0: u64 = 1_000_000;
const SHARDS: usize = 2;
/// `routing.position_update_ms`: each tick is due.
const TICK_MS: u64 = 1_000;

/// Accept by hand; and no conversation is abandoned, since the router-only
/// bench connects no visitor (the queue must stay at 50,000).
fn routing_config() -> RoutingConfig {
    RoutingConfig {
        auto_assign: false,
        max_queued: 2 * WAITING,
        abandon_after_s: 0,
        ..RoutingConfig::default()
    }
}

fn group() -> GroupName {
    GroupName::from("default")
}

/// The router alone: `accept` of the first in line, and every action it
/// queues, drained.
fn dequeue_router(c: &mut Criterion) {
    let mut r = Router::new(routing_config(), 1);
    let agent = AgentInfo { id: UserId::from("a1"), name: Arc::from("a1"), groups: Arc::from([]) };
    r.agent_connected(agent, 1, T0);
    r.presence("a1", 1, PresenceStatus::Online, Some(5), T0).expect("online");
    let open = |r: &mut Router, n: usize| {
        let req = OpenRequest { visitor: UserId::from(format!("v{n}")), group: group(), vip_level: 0 };
        r.open(req).expect("room in the queue");
    };
    for n in 0..WAITING {
        open(&mut r, n);
    }
    while r.poll_action().is_some() {}
    let closer =
        Actor { role: Role::Agent, id: UserId::from("a1"), name: Arc::from("a1"), groups: Arc::from([]) };
    let mut next = WAITING;
    let mut now = T0;
    c.bench_function("routing/dequeue_50k", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let first: ConvId = r.queue("default").next().expect("someone waits");
                let start = Instant::now();
                r.accept("a1", first).expect("accepted");
                while let Some(a) = r.poll_action() {
                    black_box(a);
                }
                spent += start.elapsed();
                now += TICK_MS;
                r.tick(now);
                r.close(&closer, first).expect("closed");
                open(&mut r, next);
                next += 1;
                while r.poll_action().is_some() {}
            }
            spent
        })
    });
    c.bench_function("routing/tick_50k", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let first: ConvId = r.queue("default").next().expect("someone waits");
                r.accept("a1", first).expect("accepted");
                while r.poll_action().is_some() {}
                now += TICK_MS;
                let start = Instant::now();
                r.tick(now);
                let mut told = 0;
                while let Some(a) = r.poll_action() {
                    told += 1;
                    black_box(a);
                }
                spent += start.elapsed();
                assert_eq!(told, WAITING - 1, "every position behind the first moved");
                r.close(&closer, first).expect("closed");
                open(&mut r, next);
                next += 1;
                while r.poll_action().is_some() {}
            }
            spent
        })
    });
}

fn addr(shard: u16, slot: u32) -> SessionAddr {
    SessionAddr { shard, slot, generation: 1 }
}

fn identity(role: Role, id: &str) -> Identity {
    Identity {
        role,
        id: Arc::from(id),
        name: Arc::from(id),
        groups: Arc::from([]),
        meta: Meta::new(),
        anonymous: false,
    }
}

/// A visitor connects from `slot` of shard 0 and opens a conversation.
fn visit(m: &mut Machine, n: usize) {
    let v = identity(Role::Visitor, &format!("v{n}"));
    let reply: Reply = (addr(0, n as u32), Codec::Json, Some(1));
    m.handle_hello(reply, v.clone(), T0);
    let visitor = Visitor { id: v.id.clone(), name: v.name.clone(), meta: Meta::new() };
    let open = RouteRequest::Open { visitor, group: group(), vip_level: 0 };
    m.handle_route((addr(0, n as u32), Codec::Json, Some(2)), v.actor(), open, T0);
}

/// The router machine: the `accept` command and every output it makes
/// (the posts the shard loop would send).
fn dequeue_machine(c: &mut Criterion) {
    let config = CoreConfig { routing: routing_config(), ..CoreConfig::default() };
    let (mut m, _) = Machine::new(Arc::new(config), SHARDS, 1, Vec::new(), T0);
    let me: Reply = (addr(1, 1), Codec::Json, Some(1));
    let a1 = identity(Role::Agent, "a1");
    m.handle_hello(me, a1.clone(), T0);
    let online = RouteRequest::Presence { status: PresenceStatus::Online, capacity: Some(5) };
    m.handle_route(me, a1.actor(), online, T0);
    for n in 0..WAITING {
        visit(&mut m, n);
    }
    while m.poll_output().is_some() {}
    let mut next = WAITING;
    let mut now = T0;
    c.bench_function("machine/dequeue_50k", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let first: ConvId = m.routing().queue("default").next().expect("someone waits");
                let start = Instant::now();
                m.handle_route(me, a1.actor(), RouteRequest::Accept { conv: first }, T0);
                while let Some(o) = m.poll_output() {
                    black_box(o);
                }
                spent += start.elapsed();
                now += TICK_MS;
                m.handle_tick(now);
                m.handle_route(me, a1.actor(), RouteRequest::Close { conv: first }, now);
                visit(&mut m, next);
                next += 1;
                while m.poll_output().is_some() {}
            }
            spent
        })
    });
    c.bench_function("machine/tick_50k", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let first: ConvId = m.routing().queue("default").next().expect("someone waits");
                m.handle_route(me, a1.actor(), RouteRequest::Accept { conv: first }, now);
                while m.poll_output().is_some() {}
                now += TICK_MS;
                let start = Instant::now();
                m.handle_tick(now);
                let mut posts = 0;
                while let Some(o) = m.poll_output() {
                    posts += 1;
                    black_box(o);
                }
                spent += start.elapsed();
                assert_eq!(posts, SHARDS, "one batch per shard");
                m.handle_route(me, a1.actor(), RouteRequest::Close { conv: first }, now);
                visit(&mut m, next);
                next += 1;
                while m.poll_output().is_some() {}
            }
            spent
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(10));
    targets = dequeue_router, dequeue_machine
}
criterion_main!(benches);
