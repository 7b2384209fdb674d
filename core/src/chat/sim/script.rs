//! A cast of clients and the actions a simulated run is made of: what the
//! fuzz target decodes its input into, and what a test that replays one of
//! its findings writes by hand. [`World`] carries each action out on a
//! [`Sim`] and checks every rule of [`super::check`] after it.
//!
//! The cast ([`CAST`]) is small on purpose, so that a few bytes make
//! clients meet: two agents serving every group and one serving only
//! `sales` (one of the first with a second device), a visitor with two
//! tabs, another visitor, and an anonymous visitor who comes back with
//! the key it was given. Conversations are named by number (1–6), so
//! commands also reach conversations that are not the sender's, or do not
//! exist.

use std::collections::BTreeMap;

use kefu_proto::client::{ClientFrame, Codec, Command, Event, TransferTarget};
use kefu_proto::{ConvId, PresenceStatus, Role};

use super::check::{Checker, Violation};
use super::{Seen, Sim};
use crate::CoreConfig;
use crate::auth::Claims;
use crate::chat::SessionAddr;
use crate::config::OfflinePolicy;

/// The simulation's clock at the start, ms since the epoch.
pub const T0_MS: u64 = 1_800_000_000_000;

/// How long the cast's tokens are valid: a run that ticks past it sees
/// its token sessions expire.
pub const TOKEN_VALID_S: u64 = 3600;

/// Who a client is.
#[derive(Debug, Clone, Copy)]
pub enum Cast {
    /// An agent with a token: id and groups (none: every group).
    Agent(&'static str, &'static [&'static str]),
    /// A visitor with a token.
    Visitor(&'static str),
    /// An anonymous visitor: new the first time, then returning with the
    /// key its first `connected` gave it.
    Anonymous,
}

/// The clients, each on its shard (its index modulo the shards).
pub const CAST: [Cast; 7] = [
    Cast::Agent("a1", &[]),
    Cast::Agent("a2", &["sales"]),
    Cast::Agent("a1", &[]),
    Cast::Visitor("v1"),
    Cast::Visitor("v1"),
    Cast::Visitor("v2"),
    Cast::Anonymous,
];

/// Groups an `open` or a `transfer` names (none: the default group).
const GROUPS: [Option<&str>; 3] = [None, Some("default"), Some("sales")];

/// Agents a `transfer` names.
const AGENTS: [&str; 3] = ["a1", "a2", "a3"];

/// One step of a run. Clients are indexes into [`CAST`] and shards are
/// taken modulo the simulation's; a conversation `n` is `ConvId(1 + n % 6)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Opens a connection and sends `connect` (on an open one: `connect`
    /// again). `resume`: 0 none, else every conversation the client has
    /// seen, from `resume - 1` messages before the last it saw.
    Connect { client: u8, resume: u8, binary: bool },
    /// The client's connection ends.
    Disconnect { client: u8 },
    /// `presence` (0 online, 1 away, 2 offline), with a capacity if not 0.
    Presence { client: u8, status: u8, capacity: u8 },
    /// `open` in [`GROUPS`]`[group % 3]`.
    Open { client: u8, group: u8 },
    /// `send` with cid `c{cid % 4}` (so resends happen); text 0 "hi", 1
    /// "bug" (the default auto-reply answers it), else "hello".
    Send { client: u8, conv: u8, cid: u8, text: u8 },
    /// `read` up to `seq`.
    Read { client: u8, conv: u8, seq: u8 },
    /// `typing`.
    Typing { client: u8, conv: u8 },
    /// `history` before `before` (0: the end), `limit` messages.
    History { client: u8, conv: u8, before: u8, limit: u8 },
    /// `accept`.
    Accept { client: u8, conv: u8 },
    /// `transfer` to [`AGENTS`]`[to]` for `to < 3`, else to a group of [`GROUPS`].
    Transfer { client: u8, conv: u8, to: u8 },
    /// `close`.
    Close { client: u8, conv: u8 },
    /// `ping`.
    Ping { client: u8 },
    /// The shard handles the oldest message in its inbox.
    Step { shard: u8 },
    /// Storage commits the shard's oldest write.
    Commit { shard: u8 },
    /// Storage fails the shard's oldest write.
    Fail { shard: u8 },
    /// The shard takes up to `max` of its completions.
    Complete { shard: u8, max: u8 },
    /// Time passes; the shard's timers run.
    Tick { shard: u8, ms: u64 },
}

/// A client's side of the run.
#[derive(Debug, Default)]
struct Client {
    addr: Option<SessionAddr>,
    /// The last `msg` seq it got of each conversation, for `resume`.
    seen: BTreeMap<ConvId, u64>,
    /// An anonymous visitor's id and key, once it was given them.
    anonymous: Option<(String, String)>,
    next_id: i64,
}

/// A simulated run: the shards, the clients, the checks.
pub struct World {
    sim: Sim,
    clients: Vec<Client>,
    checker: Checker,
    /// Print every action and everything seen (replaying a finding).
    trace: bool,
}

impl World {
    /// `shards` shards (2 or 3 make sense); `flags` vary the rules: bit 0
    /// turns automatic assignment off, bit 1 requeues an offline agent's
    /// conversations.
    pub fn new(shards: usize, flags: u8) -> World {
        let mut core = CoreConfig::default();
        core.routing.auto_assign = flags & 1 == 0;
        if flags & 2 != 0 {
            core.routing.offline_policy = OfflinePolicy::Requeue;
        }
        // Small windows, so that a short run reaches their edges: a resume
        // replays at most 3 messages, and a resend older than the 4 cids
        // a conversation remembers is found in storage.
        core.limits.max_resume_messages = 3;
        core.limits.recent_cids = 4;
        World {
            sim: Sim::new(shards, core, T0_MS, 64, 64 * 1024),
            clients: CAST.iter().map(|_| Client::default()).collect(),
            checker: Checker::new(),
            trace: false,
        }
    }

    /// Prints every action and everything the simulation sees, to stderr.
    pub fn trace(&mut self, on: bool) {
        self.trace = on;
    }

    /// The simulation, to look at.
    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    /// Carries out `action`, then checks what it caused.
    pub fn act(&mut self, action: &Action) -> Result<(), Violation> {
        if self.trace {
            eprintln!("== {action:?}");
        }
        let shards = self.sim.shards();
        let shard = |s: u8| usize::from(s) % shards;
        match *action {
            Action::Connect { client, resume, binary } => self.connect(client, resume, binary),
            Action::Disconnect { client } => {
                if let Some(addr) = self.client(client).addr.take() {
                    self.sim.gone(addr);
                }
            }
            Action::Presence { client, status, capacity } => {
                let status = [PresenceStatus::Online, PresenceStatus::Away, PresenceStatus::Offline]
                    [usize::from(status) % 3];
                let capacity = (capacity != 0).then_some(u32::from(capacity % 4));
                self.command(client, Command::Presence { status, capacity });
            }
            Action::Open { client, group } => {
                let group = GROUPS[usize::from(group) % 3].map(str::to_string);
                self.command(client, Command::Open { group, meta: Default::default() });
            }
            Action::Send { client, conv, cid, text } => {
                let text = ["hi", "bug", "hello"][usize::from(text).min(2)];
                let send = Command::Send {
                    conv: conv_id(conv),
                    cid: format!("c{}", cid % 4),
                    text: Some(text.into()),
                    attachment: None,
                };
                self.command(client, send);
            }
            Action::Read { client, conv, seq } => {
                self.command(client, Command::Read { conv: conv_id(conv), seq: u64::from(seq) })
            }
            Action::Typing { client, conv } => self.command(client, Command::Typing { conv: conv_id(conv) }),
            Action::History { client, conv, before, limit } => {
                let before = (before != 0).then_some(u64::from(before));
                let limit = Some(u32::from(limit % 4) + 1);
                self.command(client, Command::History { conv: conv_id(conv), before, limit });
            }
            Action::Accept { client, conv } => self.command(client, Command::Accept { conv: conv_id(conv) }),
            Action::Transfer { client, conv, to } => {
                let to = match usize::from(to) % (AGENTS.len() + GROUPS.len() - 1) {
                    i if i < AGENTS.len() => TransferTarget::Agent(AGENTS[i].into()),
                    i => TransferTarget::Group(GROUPS[i - AGENTS.len() + 1].unwrap_or("default").into()),
                };
                self.command(client, Command::Transfer { conv: conv_id(conv), to });
            }
            Action::Close { client, conv } => self.command(client, Command::Close { conv: conv_id(conv) }),
            Action::Ping { client } => self.command(client, Command::Ping),
            Action::Step { shard: s } => {
                self.sim.step(shard(s));
            }
            Action::Commit { shard: s } => {
                self.sim.commit(shard(s));
            }
            Action::Fail { shard: s } => {
                self.sim.fail(shard(s));
            }
            Action::Complete { shard: s, max } => {
                self.sim.complete(shard(s), usize::from(max).max(1));
            }
            Action::Tick { shard: s, ms } => self.sim.tick(shard(s), ms),
        }
        self.check()
    }

    /// Lets everything that waits run to its end, then checks what must
    /// hold once nothing is left to do.
    pub fn finish(&mut self) -> Result<(), Violation> {
        let quiet = self.sim.run_until_quiet(100_000);
        self.check()?;
        if !quiet {
            return Err("the simulation never went quiet".into());
        }
        self.checker.quiet()
    }

    /// Runs `actions`, then [`Self::finish`].
    pub fn run(&mut self, actions: &[Action]) -> Result<(), Violation> {
        for (i, action) in actions.iter().enumerate() {
            self.act(action).map_err(|v| format!("after action {i} ({action:?}): {v}"))?;
        }
        self.finish().map_err(|v| format!("once quiet: {v}"))
    }

    fn client(&mut self, client: u8) -> &mut Client {
        let n = self.clients.len();
        &mut self.clients[usize::from(client) % n]
    }

    fn connect(&mut self, client: u8, resume: u8, binary: bool) {
        let i = usize::from(client) % CAST.len();
        let addr = match self.clients[i].addr.filter(|a| self.sim.is_live(*a)) {
            Some(addr) => addr,
            None => {
                let codec = if binary { Codec::FlatBuffers } else { Codec::Json };
                let shard = i % self.sim.shards();
                let addr = self.sim.open(shard, i as u32, codec);
                self.clients[i].addr = Some(addr);
                addr
            }
        };
        let c = &mut self.clients[i];
        let resume = match resume {
            0 => BTreeMap::new(),
            r => c.seen.iter().map(|(conv, seq)| (*conv, seq.saturating_sub(u64::from(r - 1)))).collect(),
        };
        let claims = |role, sub: &str, groups: &[&str]| Claims {
            sub: sub.into(),
            role,
            name: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            meta: Default::default(),
            exp: T0_MS / 1000 + TOKEN_VALID_S,
            nbf: None,
        };
        // Signing is a good part of a short run's time, and a client's
        // token is always the same: signed once per thread.
        thread_local! {
            static TOKENS: std::cell::RefCell<[Option<String>; CAST.len()]> = Default::default();
        }
        let token = |claims: Claims| {
            TOKENS.with_borrow_mut(|t| t[i].get_or_insert_with(|| self.sim.token(&claims)).clone())
        };
        let (token, visitor_id, visitor_key) = match CAST[i] {
            Cast::Agent(id, groups) => (Some(token(claims(Role::Agent, id, groups))), None, None),
            Cast::Visitor(id) => (Some(token(claims(Role::Visitor, id, &[]))), None, None),
            Cast::Anonymous => match c.anonymous.clone() {
                Some((id, key)) => (None, Some(id), Some(key)),
                None => (None, None, None),
            },
        };
        let id = self.next_id(i);
        self.sim.frame(
            addr,
            ClientFrame { id: Some(id), body: Command::Connect { token, visitor_id, visitor_key, resume } },
        );
    }

    fn next_id(&mut self, i: usize) -> i64 {
        let c = &mut self.clients[i];
        c.next_id += 1;
        c.next_id
    }

    /// Sends `body` on the client's connection, if it has one.
    fn command(&mut self, client: u8, body: Command) {
        let i = usize::from(client) % CAST.len();
        let Some(addr) = self.clients[i].addr else { return };
        let id = self.next_id(i);
        self.sim.frame(addr, ClientFrame { id: Some(id), body });
    }

    /// Checks what the simulation saw since the last check, and lets each
    /// client keep what it needs for a later `connect`.
    fn check(&mut self) -> Result<(), Violation> {
        let seen: Vec<Seen> = self.sim.take_log().collect();
        for s in seen {
            if self.trace {
                eprintln!("   {s:?}");
            }
            if let Seen::Written { to, frames } = &s
                && let Some(c) = self.clients.iter_mut().find(|c| c.addr == Some(*to))
            {
                for f in frames.iter() {
                    match &f.body {
                        Event::Msg(m) => {
                            c.seen.insert(m.conv, m.seq);
                        }
                        Event::Connected { user, visitor_key: Some(key), .. } => {
                            c.anonymous = Some((user.id.clone(), key.clone()));
                        }
                        _ => {}
                    }
                }
            }
            self.checker.see(s)?;
        }
        Ok(())
    }
}

/// Actions per input at most: runs stay short, so that libFuzzer does
/// many of them.
pub const ACTIONS_MAX: usize = 128;

/// Time steps a `Tick` picks from: within a typing interval, past one, past
/// the offline grace period, past the tokens' validity.
const TICKS_MS: [u64; 6] = [1, 400, 1_500, 30_000, 61_000, 3_600_000];

/// Decodes fuzzer input into a run: byte 0 picks the shards (bit 0: 2 or
/// 3) and the rules' flags (bits 1–2, see [`World::new`]); then each action
/// is an opcode byte and up to four argument bytes (missing ones read as
/// 0), at most [`ACTIONS_MAX`]. Returns (shards, flags, actions).
pub fn decode(data: &[u8]) -> (usize, u8, Vec<Action>) {
    let Some((&head, mut rest)) = data.split_first() else { return (2, 0, Vec::new()) };
    let mut actions = Vec::new();
    while let Some((&op, tail)) = rest.split_first() {
        if actions.len() == ACTIONS_MAX {
            break;
        }
        let arg = |i: usize| tail.get(i).copied().unwrap_or(0);
        let (client, conv) = (arg(0), arg(1));
        // Scheduling and storage get more opcodes than commands: most
        // interleavings need several of them between two commands.
        let (action, used) = match op % 32 {
            0 | 1 => (Action::Connect { client, resume: arg(1) % 4, binary: arg(2) & 1 == 1 }, 3),
            2 => (Action::Disconnect { client }, 1),
            3 => (Action::Presence { client, status: arg(1), capacity: arg(2) }, 3),
            4 | 5 => (Action::Open { client, group: arg(1) }, 2),
            6..=8 => (Action::Send { client, conv, cid: arg(2), text: arg(3) % 3 }, 4),
            9 => (Action::Read { client, conv, seq: arg(2) % 8 }, 3),
            10 => (Action::Typing { client, conv }, 2),
            11 => (Action::History { client, conv, before: arg(2) % 8, limit: arg(3) }, 4),
            12 | 13 => (Action::Accept { client, conv }, 2),
            14 => (Action::Transfer { client, conv, to: arg(2) }, 3),
            15 => (Action::Close { client, conv }, 2),
            16 => (Action::Ping { client }, 1),
            17..=21 | 30 | 31 => (Action::Step { shard: arg(0) }, 1),
            22..=24 => (Action::Commit { shard: arg(0) }, 1),
            25 => (Action::Fail { shard: arg(0) }, 1),
            26..=28 => (Action::Complete { shard: arg(0), max: arg(1) % 4 }, 2),
            _ => (Action::Tick { shard: arg(0), ms: TICKS_MS[usize::from(arg(1)) % TICKS_MS.len()] }, 2),
        };
        actions.push(action);
        rest = tail.get(used..).unwrap_or_default();
    }
    (2 + usize::from(head & 1), (head >> 1) & 3, actions)
}

fn conv_id(n: u8) -> ConvId {
    ConvId(1 + u64::from(n % 6))
}
