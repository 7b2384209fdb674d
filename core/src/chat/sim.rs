//! The chat machines of a few shards wired together in memory and stepped
//! one input at a time, deterministically: what the fuzz target
//! `chat_machines` drives (feature `sim`; core's tests use it too).
//!
//! Why it exists beside the gateway's `chat::service`, which wires the same
//! machines: that loop carries their outputs over real mailboxes, sockets
//! and the storage writer's thread, so nobody can choose which shard runs
//! next or when a write commits, and an interleaving that breaks a rule
//! cannot be found or replayed there. This is the same dispatch, kept as
//! close as it can be (which machine gets which message; a shard's own
//! messages run right after the input that posted them; a frame for a
//! shard's own connection is written at once, through the edge that holds
//! frames until `connected`), over:
//! - each shard's inbox as one FIFO queue the caller steps ([`Sim::step`]);
//! - storage as a [`MemStore`] behind one submit queue per shard: the
//!   caller commits a shard's oldest write ([`Sim::commit`], or fails it,
//!   [`Sim::fail`]) and hands a shard its completions later
//!   ([`Sim::complete`]). That is the writer's freedom and no more: each
//!   source's writes commit in the order submitted and complete in that
//!   order, sources interleave as they may, and a committed write is
//!   readable before its shard hears of it;
//! - connections that record what is written to them; time and randomness
//!   fed by the caller.
//!
//! Left out on purpose: the business systems' bridge (queries, hooks:
//! `on_connect` and `on_message` must stay off), full inboxes and the
//! backlog (inboxes are unbounded), restarts. Everything that crosses an
//! owner goes to a log of [`Seen`] for [`check`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use kefu_proto::client::{ClientFrame, Codec, ServerFrame};
use kefu_proto::ws::close;
use kefu_proto::{ErrorCode, Role};

use super::directory::{Directory, Member};
use super::edge::{Edge, EdgeConfig};
use super::frames::SharedFrame;
use super::home::{Durable, Home};
use super::outbox::{Outbox, Output, Pending, Write};
use super::router::{self, Router};
use super::stored::ReadError;
use super::testing::{MemStore, decode_frames};
use super::{BRIDGE_SHARD, ChatMsg, SessionAddr, ShardMsg, device_of};
use crate::CoreConfig;
use crate::auth::{Claims, JwtKey};
use crate::identity::{GroupName, UserId};

pub mod check;
pub mod script;

/// The HS256 secret the simulation's edges check tokens with ([`Sim::token`]).
pub const SECRET: &[u8] = b"kefu-sim-secret";

/// What the simulation saw, in order: the inputs of [`check`].
#[derive(Debug)]
pub enum Seen {
    /// A client sent a command on its connection.
    Command {
        /// The connection.
        addr: SessionAddr,
        /// The command.
        frame: ClientFrame,
    },
    /// An edge announced a session to every shard (`SessionUp`): who it
    /// is, as its `connect` proved.
    Announced {
        /// The connection.
        addr: SessionAddr,
        /// Visitor or agent.
        role: Role,
        /// The user id.
        id: UserId,
        /// An agent's groups.
        groups: Arc<[GroupName]>,
    },
    /// A machine posted frames for a connection, at that moment (they may
    /// be held, or cross to another shard, before they are written).
    Sent {
        /// The connection.
        to: SessionAddr,
        /// The frames, decoded.
        frames: Rc<[ServerFrame]>,
    },
    /// Frames were written to a connection.
    Written {
        /// The connection.
        to: SessionAddr,
        /// The frames, decoded.
        frames: Rc<[ServerFrame]>,
    },
    /// A connection ended (the client went, or after the server closed it).
    Gone {
        /// The connection.
        addr: SessionAddr,
    },
    /// The server closed a connection.
    Closed {
        /// The connection.
        to: SessionAddr,
        /// The close code.
        code: u16,
    },
    /// A shard submitted a write.
    Submitted {
        /// The shard.
        shard: usize,
        /// The write.
        write: Write,
    },
    /// A shard took a write's outcome back (what its machine announces
    /// from). Logged after what the batch of outcomes it came in caused,
    /// since the loop carries that out only once the batch is handled: a
    /// frame posted then may come from any state of the batch.
    Completed {
        /// The shard.
        shard: usize,
        /// The write.
        write: Write,
        /// Whether it is durable.
        durable: bool,
    },
    /// Storage committed a shard's oldest write, or refused or failed it.
    Committed {
        /// The shard.
        shard: usize,
        /// The write.
        write: Write,
        /// Its outcome.
        outcome: Result<Durable, ReadError>,
    },
}

/// One connection's state, as its socket would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Open,
    /// The server closed it; the shard hears it is gone with [`Sim::gone`].
    Closed,
    /// It has ended (kept for its codec: frames for it may still be on
    /// their way, and are decoded to be checked).
    Gone,
}

/// A write waiting in storage, or its completion waiting for its shard.
struct Submission {
    token: u64,
    write: Write,
}

struct Completion {
    token: u64,
    write: Write,
    outcome: Result<Durable, ReadError>,
}

/// One shard: its machines and the loop's queues.
struct Shard {
    edge: Edge,
    home: Home,
    router: Option<Router>,
    directory: Directory,
    /// The loop's own answers (the router's frames).
    out: Outbox,
    /// What this shard posted to itself: run right after the current input.
    own: VecDeque<ShardMsg>,
    /// What other shards posted to it: run when the caller steps it.
    inbox: VecDeque<ShardMsg>,
    /// Its writes submitted, not yet committed (storage's queue for this source).
    submitted: VecDeque<Submission>,
    /// Its writes committed (or failed), not yet handed back to it.
    completions: VecDeque<Completion>,
    pending: HashMap<u64, Pending>,
    next_token: u64,
}

/// A few shards' chat machines over one store in memory (see the module doc).
pub struct Sim {
    shards: Vec<Shard>,
    /// The store every shard reads and storage writes.
    pub store: MemStore,
    conns: HashMap<SessionAddr, (Codec, Conn)>,
    /// Addresses announced already (`SessionUp` goes to every shard: seen once).
    announced: HashSet<SessionAddr>,
    generations: HashMap<(u16, u32), u32>,
    now_ms: u64,
    random: u64,
    jwt: JwtKey,
    log: Vec<Seen>,
    /// Frames decoded since the log was last taken, by buffer (each kept
    /// alive here, so that its address names it): a fan-out shares one
    /// buffer between its recipients, and a frame for a shard's own
    /// connection is posted and written at once, so each is decoded once.
    decoded: HashMap<(usize, Codec), Decoded>,
    /// Frames an edge holds until `connected`, by connection and buffer
    /// (kept alive here, so that the address names it): when the edge
    /// writes them then, they are not posted anew, and were checked when
    /// they were.
    held: HashMap<(SessionAddr, usize), SharedFrame>,
}

/// A frame buffer, and the frames it holds.
type Decoded = (SharedFrame, Rc<[ServerFrame]>);

impl Sim {
    /// `shards` shards (the router on shard 0) with `core`'s rules, at
    /// `now_ms`, holding at most `held_frames_max` frames for a session
    /// before its `connected`, and replaying at most `replay_bytes_max`
    /// bytes per conversation on resume.
    pub fn new(
        shards: usize,
        core: CoreConfig,
        now_ms: u64,
        held_frames_max: usize,
        replay_bytes_max: usize,
    ) -> Sim {
        assert!(!core.hooks.on_connect && !core.hooks.on_message, "the simulation has no hooks");
        let core = Arc::new(core);
        let jwt = JwtKey::new(SECRET, core.auth.clone()).expect("the simulation's key is valid");
        let shards = (0..shards)
            .map(|me| {
                let config = EdgeConfig {
                    core: core.clone(),
                    jwt: jwt.clone(),
                    allow_anonymous: true,
                    heartbeat_s: 30,
                    held_frames_max,
                    // No per-address limit: every simulated client is local.
                    anonymous_per_ip: None,
                    attachment_budgets: None,
                    counts: Default::default(),
                };
                let router = (me == super::ROUTER_SHARD)
                    .then(|| Router::new(core.clone(), shards, 1, Vec::new(), now_ms).0);
                Shard {
                    edge: Edge::new(me, shards, config),
                    home: Home::new(me, shards, core.clone(), replay_bytes_max, Vec::new()),
                    router,
                    directory: Directory::default(),
                    out: Outbox::new(),
                    own: VecDeque::new(),
                    inbox: VecDeque::new(),
                    submitted: VecDeque::new(),
                    completions: VecDeque::new(),
                    pending: HashMap::new(),
                    next_token: 1,
                }
            })
            .collect();
        Sim {
            shards,
            store: MemStore::default(),
            conns: HashMap::new(),
            announced: HashSet::new(),
            generations: HashMap::new(),
            now_ms,
            random: 0,
            jwt,
            log: Vec::new(),
            decoded: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// A token for `claims`, signed with [`SECRET`].
    pub fn token(&self, claims: &Claims) -> String {
        self.jwt.sign(claims)
    }

    /// The time the machines are fed, ms since the epoch.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// What was seen since the last call, in order.
    pub fn take_log(&mut self) -> std::vec::Drain<'_, Seen> {
        self.decoded.clear();
        self.log.drain(..)
    }

    /// A new connection on `shard`, registry slot `slot` (a slot's next
    /// generation each time).
    pub fn open(&mut self, shard: usize, slot: u32, codec: Codec) -> SessionAddr {
        let shard = u16::try_from(shard).expect("a few shards");
        let generation = self.generations.entry((shard, slot)).or_default();
        *generation += 1;
        let addr = SessionAddr { shard, slot, generation: *generation };
        self.conns.insert(addr, (codec, Conn::Open));
        addr
    }

    /// Whether `addr` is open (not closed by the server, not gone).
    pub fn is_open(&self, addr: SessionAddr) -> bool {
        self.conns.get(&addr).is_some_and(|(_, c)| *c == Conn::Open)
    }

    /// Whether `addr` has not gone yet (open, or closed by the server and
    /// not yet reported gone).
    pub fn is_live(&self, addr: SessionAddr) -> bool {
        self.conns.get(&addr).is_some_and(|(_, c)| *c != Conn::Gone)
    }

    /// A client sends `frame` on its open connection (as the gateway's
    /// connection task calls `ChatService::frame`).
    pub fn frame(&mut self, addr: SessionAddr, frame: ClientFrame) {
        let Some(&(codec, Conn::Open)) = self.conns.get(&addr) else { return };
        self.log.push(Seen::Command { addr, frame: frame.clone() });
        let k = usize::from(addr.shard);
        let now = self.now_ms;
        {
            let mut random = random_source(&mut self.random);
            self.shards[k].edge.handle_frame(addr, codec, frame, now, &self.store, &mut random);
        }
        self.settle(k);
    }

    /// A connection has ended (`ChatService::gone`).
    pub fn gone(&mut self, addr: SessionAddr) {
        match self.conns.get_mut(&addr) {
            Some((_, conn @ (Conn::Open | Conn::Closed))) => *conn = Conn::Gone,
            _ => return,
        }
        self.log.push(Seen::Gone { addr });
        self.held.retain(|(a, _), _| *a != addr);
        let k = usize::from(addr.shard);
        self.shards[k].edge.handle_gone(addr);
        self.settle(k);
    }

    /// Every connection the server closed and that has not gone yet.
    pub fn closed_connections(&self) -> Vec<SessionAddr> {
        let mut closed: Vec<SessionAddr> =
            self.conns.iter().filter(|(_, (_, c))| *c == Conn::Closed).map(|(a, _)| *a).collect();
        closed.sort();
        closed
    }

    /// Handles the oldest message in `shard`'s inbox; false if it had none.
    pub fn step(&mut self, shard: usize) -> bool {
        let Some(msg) = self.shards[shard].inbox.pop_front() else { return false };
        self.dispatch(shard, msg);
        self.settle(shard);
        true
    }

    /// Storage commits `shard`'s oldest submitted write; false if none waits.
    pub fn commit(&mut self, shard: usize) -> bool {
        let Some(Submission { token, write }) = self.shards[shard].submitted.pop_front() else {
            return false;
        };
        let outcome = self.store.commit(&write);
        self.log.push(Seen::Committed { shard, write: write.clone(), outcome: outcome.clone() });
        self.shards[shard].completions.push_back(Completion { token, write, outcome });
        true
    }

    /// Storage fails `shard`'s oldest submitted write (a failed commit:
    /// nothing of it stored); false if none waits.
    pub fn fail(&mut self, shard: usize) -> bool {
        let Some(Submission { token, write }) = self.shards[shard].submitted.pop_front() else {
            return false;
        };
        let outcome = Err(ReadError { code: ErrorCode::Unavailable, message: "simulated disk error".into() });
        self.log.push(Seen::Committed { shard, write: write.clone(), outcome: outcome.clone() });
        self.shards[shard].completions.push_back(Completion { token, write, outcome });
        true
    }

    /// `shard` takes up to `max` of its completions, in order, then runs
    /// what they caused (`ChatService::poll_completions`); false if none
    /// waited.
    pub fn complete(&mut self, shard: usize, max: usize) -> bool {
        let mut any = false;
        // Logged once what they caused is carried out: the loop carries a
        // batch's outputs after the whole batch (see `Seen::Completed`).
        let mut completed = Vec::new();
        for _ in 0..max {
            let Some(Completion { token, write, outcome }) = self.shards[shard].completions.pop_front()
            else {
                break;
            };
            any = true;
            completed.push(Seen::Completed { shard, write: write.clone(), durable: outcome.is_ok() });
            let Some(pending) = self.shards[shard].pending.remove(&token) else { continue };
            match outcome {
                Ok(durable) => self.committed(shard, pending, write, durable),
                Err(e) => self.failed(shard, pending, &e),
            }
        }
        self.settle(shard);
        self.log.extend(completed);
        any
    }

    /// Time passes by `ms`; then `shard`'s timers run (`ChatService::tick`).
    pub fn tick(&mut self, shard: usize, ms: u64) {
        self.now_ms += ms;
        let now = self.now_ms;
        let s = &mut self.shards[shard];
        s.edge.expire(now);
        if let Some(r) = s.router.as_mut() {
            r.handle_tick(now);
        }
        self.settle(shard);
    }

    /// Whether nothing is left to do: no message in any inbox, no write in
    /// storage or completion waiting.
    pub fn is_quiet(&self) -> bool {
        self.shards.iter().all(|s| s.inbox.is_empty() && s.submitted.is_empty() && s.completions.is_empty())
    }

    /// Runs everything that waits, shard by shard, until nothing does:
    /// inboxes, commits and completions, and the end of every connection
    /// the server closed. Stops after `steps_max` steps (false if not quiet
    /// by then).
    pub fn run_until_quiet(&mut self, steps_max: usize) -> bool {
        for _ in 0..steps_max {
            let mut moved = false;
            for k in 0..self.shards.len() {
                moved |= self.step(k);
                moved |= self.commit(k);
                moved |= self.complete(k, usize::MAX);
            }
            for addr in self.closed_connections() {
                self.gone(addr);
                moved = true;
            }
            if !moved {
                return true;
            }
        }
        self.is_quiet()
    }

    // ---- the loop, as `ChatService` has it ---------------------------

    fn dispatch(&mut self, k: usize, msg: ShardMsg) {
        let msg = match msg {
            ShardMsg::Deliver { to, bytes, .. } => return self.local_write(k, to, bytes),
            ShardMsg::Close { to, code, .. } => return self.local_close(k, to, code),
            msg => msg,
        };
        let now = self.now_ms;
        let store = &self.store;
        let s = &mut self.shards[k];
        match msg {
            ShardMsg::Deliver { .. } | ShardMsg::Close { .. } => {}
            ShardMsg::Home { reply, actor, request } => {
                s.home.handle_request(reply, &actor, request, now, &s.directory, store)
            }
            ShardMsg::Chat(msg) => match *msg {
                ChatMsg::SessionUp { addr, codec, actor, resume } => {
                    s.directory.add(actor.key(), Member { addr, codec });
                    s.home.handle_session_up(addr, codec, &actor, &resume, store);
                }
                ChatMsg::SessionDown { addr, user } => {
                    s.directory.remove(&user, addr);
                    s.home.handle_session_down(addr);
                    if let Some(r) = s.router.as_mut() {
                        r.handle_session_down(addr, &user, now)
                    }
                }
                ChatMsg::Positions { updates } => s.home.handle_positions(&updates, &s.directory),
                ChatMsg::Welcome { reply, conversations } => {
                    s.edge.handle_welcome(reply, conversations, store)
                }
                ChatMsg::Routed { addr } => s.edge.handle_routed(addr),
                ChatMsg::Change { conv, change, reply, route } => {
                    s.home.handle_change(conv, change, reply, route, now, store)
                }
                ChatMsg::Hello { reply, identity } => {
                    if let Some(r) = s.router.as_mut() {
                        r.handle_hello(reply, identity, now)
                    }
                }
                ChatMsg::AgentGone { agent, device } => {
                    if let Some(r) = s.router.as_mut() {
                        r.handle_agent_gone(&agent, device, now)
                    }
                }
                ChatMsg::Route { reply, actor, request } => {
                    if let Some(r) = s.router.as_mut() {
                        r.handle_route(reply, actor, request, now)
                    }
                }
                ChatMsg::Relay { reply, actor, request } => {
                    if let Some(r) = s.router.as_mut() {
                        r.handle_relay(reply, actor, request)
                    }
                }
                // The bridge's messages: it is not simulated.
                ChatMsg::Hooked { .. }
                | ChatMsg::Query { .. }
                | ChatMsg::Profile { .. }
                | ChatMsg::Admitted { .. } => unreachable!("the simulation has no bridge"),
            },
        }
    }

    /// Carries out every machine's outputs, then what the shard posted to
    /// itself, until nothing is left (`ChatService::settle`).
    fn settle(&mut self, k: usize) {
        loop {
            self.carry(k);
            let Some(msg) = self.shards[k].own.pop_front() else { return };
            self.dispatch(k, msg);
        }
    }

    /// `ChatService::carry`: edge, home, the loop's own, then the router.
    fn carry(&mut self, k: usize) {
        loop {
            let s = &mut self.shards[k];
            if let Some(out) = s.edge.poll_output() {
                self.output(k, out);
            } else if let Some(out) = s.home.poll_output() {
                self.output(k, out);
            } else if let Some(out) = s.out.pop() {
                self.output(k, out);
            } else if let Some(out) = s.router.as_mut().and_then(Router::poll_output) {
                self.carry_router(k, out);
            } else {
                return;
            }
        }
    }

    fn output(&mut self, k: usize, out: Output) {
        match out {
            Output::Post { to, msg } => self.post(k, to, msg),
            Output::Submit { write, then } => self.submit(k, write, then),
            Output::Hook { .. } => unreachable!("the simulation has no hooks"),
        }
    }

    /// The gateway's `carry_router`.
    fn carry_router(&mut self, k: usize, output: router::Output) {
        let s = &mut self.shards[k];
        match output {
            router::Output::Post { shard, msg } => self.post(k, shard, ShardMsg::Chat(Box::new(msg))),
            router::Output::PostHome { shard, reply, actor, request } => {
                self.post(k, shard, ShardMsg::Home { reply, actor, request })
            }
            router::Output::Write { reply: (to, codec, _), frame } => s.out.send(to, codec, &frame),
            router::Output::ToAgents { frame } => s.out.deliver(s.directory.agents(), &frame),
            router::Output::LogPresence { agent, status } => {
                let write = Write::Presence { agent, status, at_ms: self.now_ms };
                self.submit(k, write, Pending::Nothing);
            }
            // A count in the gateway's /metrics: nothing to simulate.
            router::Output::Abandoned { .. } => {}
            router::Output::ReplaceDevice { agent, device } => {
                let old = s.directory.sessions(Role::Agent, &agent).find(|m| device_of(m.addr) == device);
                if let Some(m) = old {
                    s.out.close(m.addr, close::REPLACED, "replaced by a newer device");
                }
            }
        }
    }

    /// `ChatService::post` with inboxes that are never full: a frame or
    /// close for an own connection at once, another own message after the
    /// input, the rest into the shard's inbox.
    fn post(&mut self, k: usize, to: usize, msg: ShardMsg) {
        if to == usize::from(BRIDGE_SHARD) {
            return;
        }
        if let ShardMsg::Deliver { to: addr, bytes, .. } = &msg {
            // A frame an edge held until `connected`, written now, was
            // checked when it was posted.
            let flushed = self.held.remove(&(*addr, Arc::as_ptr(bytes) as usize)).is_some();
            if !flushed {
                let frames = self.decode(*addr, bytes);
                self.log.push(Seen::Sent { to: *addr, frames });
            }
        }
        if let ShardMsg::Chat(m) = &msg
            && let ChatMsg::SessionUp { addr, actor, .. } = &**m
            && self.announced.insert(*addr)
        {
            let (role, id, groups) = (actor.role, actor.id.clone(), actor.groups.clone());
            self.log.push(Seen::Announced { addr: *addr, role, id, groups });
        }
        if to != k {
            return self.shards[to].inbox.push_back(msg);
        }
        match msg {
            ShardMsg::Deliver { to, bytes, .. } => self.local_write(k, to, bytes),
            ShardMsg::Close { to, code, .. } => self.local_close(k, to, code),
            msg => self.shards[k].own.push_back(msg),
        }
    }

    /// A frame for one of shard `k`'s connections: through its edge (which
    /// holds it until `connected`), then to the socket if it is open.
    fn local_write(&mut self, k: usize, to: SessionAddr, bytes: SharedFrame) {
        let key = (to, Arc::as_ptr(&bytes) as usize);
        let kept = bytes.clone();
        let Some(bytes) = self.shards[k].edge.pass(to, bytes) else {
            self.held.insert(key, kept);
            return;
        };
        if self.is_open(to) {
            let frames = self.decode(to, &bytes);
            self.log.push(Seen::Written { to, frames });
        }
    }

    fn local_close(&mut self, k: usize, to: SessionAddr, code: u16) {
        self.shards[k].edge.closing(to);
        self.held.retain(|(addr, _), _| *addr != to);
        if let Some((_, conn @ Conn::Open)) = self.conns.get_mut(&to) {
            *conn = Conn::Closed;
            self.log.push(Seen::Closed { to, code });
        }
    }

    fn decode(&mut self, to: SessionAddr, bytes: &SharedFrame) -> Rc<[ServerFrame]> {
        let codec = self.conns.get(&to).map_or(Codec::Json, |(c, _)| *c);
        let key = (Arc::as_ptr(bytes) as usize, codec);
        let (_, frames) =
            self.decoded.entry(key).or_insert_with(|| (bytes.clone(), decode_frames(codec, bytes).into()));
        frames.clone()
    }

    fn submit(&mut self, k: usize, write: Write, then: Pending) {
        let s = &mut self.shards[k];
        let token = s.next_token;
        s.next_token += 1;
        s.pending.insert(token, then);
        self.log.push(Seen::Submitted { shard: k, write: write.clone() });
        s.submitted.push_back(Submission { token, write });
    }

    /// `ChatService::committed`.
    fn committed(&mut self, k: usize, pending: Pending, write: Write, durable: Durable) {
        let now = self.now_ms;
        let s = &mut self.shards[k];
        match pending {
            Pending::Nothing => {}
            Pending::UserChanged { .. } => unreachable!("the simulation has no bridge"),
            Pending::Connected { .. } => {
                let mut random = random_source(&mut self.random);
                s.edge.handle_committed(pending, now, &self.store, &mut random)
            }
            pending => s.home.handle_committed(pending, write, durable, now, &s.directory, &self.store),
        }
    }

    /// `ChatService::failed`.
    fn failed(&mut self, k: usize, pending: Pending, error: &ReadError) {
        let s = &mut self.shards[k];
        match pending {
            Pending::UserChanged { .. } => unreachable!("the simulation has no bridge"),
            Pending::Connected { .. } => s.edge.handle_failed(pending, error),
            pending => s.home.handle_failed(pending, error, &self.store),
        }
    }
}

/// Deterministic "randomness" for new anonymous visitors: a counter.
fn random_source(counter: &mut u64) -> impl FnMut() -> [u8; 16] + '_ {
    move || {
        *counter += 1;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&counter.to_le_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests;
