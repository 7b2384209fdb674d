//! The rules a simulated run is held to, checked on what it saw ([`Seen`]),
//! in order, after every step; [`Checker::quiet`] adds what must hold once
//! nothing is left to do. Each rule names where it comes from: the
//! protocol's "Guarantees" (docs/protocol.md) or the machines' own docs.
//!
//! Who may hear of a conversation (a frame that names it: `msg`, `ack`,
//! `typing`, `read`, `conversation`, `resumed`, `history`) is its members,
//! as [`crate::conversation::Conversation`] lets them read it: its visitor;
//! while it is queued, the agents who serve its group; while assigned or
//! once closed, its agent. The home fans out from the conversation as it
//! holds it in memory, which runs ahead of what is durable (a change is
//! applied, then written) and falls back to it (a failed write reloads
//! it), and an agent that just lost it is told so: the rule is therefore
//! "a member in the latest durable state the home has heard of, the one
//! before it, or one submitted since", at the moment the frame was posted. The `connected`
//! list is not checked: it is the router's view, which may name a
//! conversation its home has not created yet.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use kefu_proto::client::{Command, Event, ServerFrame};
use kefu_proto::{ConvId, ConvStatus, Role};

use super::Seen;
use crate::chat::SessionAddr;
use crate::chat::outbox::{ConvState, Write};
use crate::identity::{GroupName, UserId, serves};

/// A broken rule, with what the checker knew.
pub type Violation = String;

/// Who a session is, as its edge announced it.
#[derive(Debug, Clone)]
struct Who {
    role: Role,
    id: UserId,
    groups: std::sync::Arc<[GroupName]>,
}

/// What one session received of one conversation.
#[derive(Debug, Default)]
struct Stream {
    /// The `msg` seqs, in the order received.
    msgs: Vec<u64>,
    /// The last seq of its stream: a `msg`, an `ack` of its own new
    /// message, or where a `resumed` left off.
    last: Option<u64>,
}

#[derive(Debug, Default)]
struct Session {
    who: Option<Who>,
    connected: bool,
    /// Closed by the server, or gone.
    ended: bool,
    streams: HashMap<ConvId, Stream>,
    answered: HashSet<i64>,
    /// Commands that must get exactly one answer (not `read`, `typing`,
    /// which are answered only when refused).
    asked: Vec<i64>,
    /// `history` commands asking for the newest page, by id.
    newest_pages: HashMap<i64, ConvId>,
}

/// A conversation's states, as its home submitted them, and how far
/// storage has got.
#[derive(Debug, Default)]
struct States {
    submitted: Vec<ConvState>,
    /// Of `submitted`, how many storage has committed or failed.
    resolved: usize,
    /// Of `submitted`, how many outcomes the home has taken back.
    handed: usize,
    /// The latest durable one the home has heard of: what it announces
    /// from (storage may be further on).
    announced: Option<usize>,
}

impl States {
    /// The states a frame about it may be sent by (see the module doc).
    fn window(&self) -> &[ConvState] {
        let from = self.announced.map_or(0, |d| d.saturating_sub(1));
        &self.submitted[from..]
    }
}

/// A conversation's stored messages.
#[derive(Debug, Default)]
struct Log {
    /// seq → (sender role, sender id, cid), from 1 on.
    messages: Vec<(Role, String, String)>,
    /// A message write of it failed or was a resend storage caught: a
    /// seq the home handed out went unused, and writes behind it may
    /// conflict.
    disturbed: bool,
    closed: bool,
}

/// The rules, checked incrementally.
#[derive(Debug, Default)]
pub struct Checker {
    sessions: HashMap<SessionAddr, Session>,
    states: HashMap<ConvId, States>,
    logs: HashMap<ConvId, Log>,
    /// (sender role, sender id, conversation, cid) → the seq its acks carry.
    acks: HashMap<(Role, UserId, ConvId, String), u64>,
    /// Per conversation, the highest seq any ack has been posted for.
    acked: HashMap<ConvId, u64>,
}

impl Checker {
    /// A checker that has seen nothing.
    pub fn new() -> Checker {
        Checker::default()
    }

    /// Checks what was seen next, in order; the first broken rule.
    pub fn see(&mut self, seen: Seen) -> Result<(), Violation> {
        match seen {
            Seen::Command { addr, frame } => {
                let must_answer = !matches!(frame.body, Command::Read { .. } | Command::Typing { .. });
                if let (Some(id), true) = (frame.id, must_answer) {
                    let s = self.sessions.entry(addr).or_default();
                    s.asked.push(id);
                    if let Command::History { conv, before: None, .. } = frame.body {
                        s.newest_pages.insert(id, conv);
                    }
                }
                Ok(())
            }
            Seen::Announced { addr, role, id, groups } => {
                let s = self.sessions.entry(addr).or_default();
                if s.who.is_some() {
                    return Err(format!("{addr:?} announced twice"));
                }
                s.who = Some(Who { role, id, groups });
                Ok(())
            }
            Seen::Sent { to, frames } => frames.iter().try_for_each(|f| self.sent(to, f)),
            Seen::Written { to, frames } => frames.iter().try_for_each(|f| self.written(to, f)),
            Seen::Closed { to, .. } | Seen::Gone { addr: to } => {
                self.sessions.entry(to).or_default().ended = true;
                Ok(())
            }
            Seen::Submitted { write: Write::Conversation(state), .. } => {
                self.states.entry(state.conv).or_default().submitted.push(state);
                Ok(())
            }
            Seen::Submitted { .. } => Ok(()),
            Seen::Committed { write, outcome, .. } => self.committed(write, outcome.ok()),
            Seen::Completed { write: Write::Conversation(state), durable, .. } => {
                let states = self.states.entry(state.conv).or_default();
                let i = states.handed;
                states.handed += 1;
                if states.submitted.get(i) != Some(&state) {
                    return Err(format!("{}: a home took back {state:?}, not the oldest", state.conv));
                }
                if durable {
                    states.announced = Some(i);
                }
                Ok(())
            }
            Seen::Completed { .. } => Ok(()),
        }
    }

    /// A write's outcome: the store's rules (gap-free seqs, a closed
    /// conversation stays closed and takes no message).
    fn committed(
        &mut self,
        write: Write,
        durable: Option<crate::chat::home::Durable>,
    ) -> Result<(), Violation> {
        match write {
            Write::Conversation(state) => {
                let states = self.states.entry(state.conv).or_default();
                let i = states.resolved;
                states.resolved += 1;
                // One home submits a conversation's states, and storage
                // commits one source's writes in order.
                if states.submitted.get(i) != Some(&state) {
                    return Err(format!(
                        "{}: storage resolved {state:?}, not the oldest submitted",
                        state.conv
                    ));
                }
                if durable.is_none() {
                    return Ok(());
                }
                let log = self.logs.entry(state.conv).or_default();
                if log.closed && state.status != ConvStatus::Closed {
                    return Err(format!(
                        "{}: stored {:?} after it was stored closed",
                        state.conv, state.status
                    ));
                }
                log.closed = state.status == ConvStatus::Closed;
                Ok(())
            }
            Write::Message(m) => {
                let log = self.logs.entry(m.conv).or_default();
                let Some(durable) = durable else {
                    // Failed, or refused as a seq conflict.
                    let last = log.messages.len() as u64;
                    let conflict = m.seq != last + 1;
                    if conflict && !log.disturbed {
                        return Err(format!(
                            "{}: the home handed out seq {} after {last}, with no failed or deduplicated write before",
                            m.conv, m.seq
                        ));
                    }
                    log.disturbed = true;
                    return Ok(());
                };
                if durable.duplicate {
                    log.disturbed = true;
                    return Ok(());
                }
                if log.closed {
                    return Err(format!(
                        "{}: message {} stored after the conversation was closed",
                        m.conv, m.seq
                    ));
                }
                if m.seq != log.messages.len() as u64 + 1 || durable.seq != m.seq {
                    return Err(format!("{}: stored seq {} after {}", m.conv, m.seq, log.messages.len()));
                }
                log.messages.push((m.from.role, m.from.id, m.cid));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A frame posted for `to`: membership, and durable before announced.
    fn sent(&mut self, to: SessionAddr, frame: &ServerFrame) -> Result<(), Violation> {
        let Some(conv) = conv_of(frame) else { return Ok(()) };
        let who = self.sessions.get(&to).and_then(|s| s.who.clone());
        let Some(who) = who else {
            return Err(format!("{frame:?} about {conv} posted to {to:?}, which no edge announced"));
        };
        let window = self.states.get(&conv).map_or(&[][..], States::window);
        if !window.iter().any(|s| member(s, &who)) {
            return Err(format!(
                "{frame:?} posted to {to:?} ({who:?}), not a member of {conv} in any of {window:?}"
            ));
        }
        let stored =
            |seq: u64| self.logs.get(&conv).and_then(|l| l.messages.get((seq as usize).checked_sub(1)?));
        match &frame.body {
            Event::Msg(m) => {
                let want = (m.from.role, m.from.id.clone(), m.cid.clone());
                if stored(m.seq) != Some(&want) {
                    return Err(format!("{m:?} posted to {to:?} is not what is stored: {:?}", stored(m.seq)));
                }
            }
            Event::Ack { cid, seq, .. } => {
                let want = (who.role, who.id.to_string(), cid.clone());
                if stored(*seq) != Some(&want) {
                    return Err(format!("{frame:?} to {to:?} acks what is not stored: {:?}", stored(*seq)));
                }
                let acked = self.acked.entry(conv).or_default();
                *acked = (*acked).max(*seq);
            }
            // Read your ack (docs/protocol.md, "Guarantees": an acked
            // message is in `history`): the newest page, once an ack is
            // out, reaches at least the acked seq.
            Event::History { messages, .. } => {
                let asked = frame.id.and_then(|id| self.sessions.get(&to)?.newest_pages.get(&id));
                let acked = self.acked.get(&conv).copied().unwrap_or(0);
                let newest = messages.last().map_or(0, |m| m.seq);
                if asked == Some(&conv) && newest < acked {
                    return Err(format!(
                        "{to:?}: the newest history page of {conv} ends at seq {newest}, but seq {acked} was acked"
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A frame written to `to`'s socket: `connected` first, one answer per
    /// command, and each conversation's messages in seq order.
    fn written(&mut self, to: SessionAddr, frame: &ServerFrame) -> Result<(), Violation> {
        let s = self.sessions.entry(to).or_default();
        if let Some(id) = frame.id
            && !s.answered.insert(id)
        {
            return Err(format!("{to:?}: command {id} answered twice, again with {frame:?}"));
        }
        if let Event::Connected { user, role, .. } = &frame.body {
            let Some(who) = &s.who else { return Err(format!("{to:?}: connected before it was announced")) };
            if *role != who.role || user.id != *who.id {
                return Err(format!("{to:?}: connected as {role:?} {} but announced as {who:?}", user.id));
            }
            s.connected = true;
            return Ok(());
        }
        if s.who.is_some() && !s.connected {
            return Err(format!("{to:?}: {frame:?} written before connected"));
        }
        let visitor = s.who.as_ref().is_some_and(|w| w.role == Role::Visitor);
        let (conv, seq) = match &frame.body {
            Event::Msg(m) => (m.conv, m.seq),
            Event::Ack { conv, seq, duplicate, cid, .. } => {
                let Some(who) = &s.who else { return Err(format!("{to:?}: an ack before it was announced")) };
                let key = (who.role, who.id.clone(), *conv, cid.clone());
                let first = *self.acks.entry(key).or_insert(*seq);
                if first != *seq {
                    return Err(format!("{to:?}: {frame:?}, but the same cid was acked with seq {first}"));
                }
                if *duplicate {
                    return Ok(());
                }
                (*conv, *seq)
            }
            Event::Resumed { conv, from, to: upto } => {
                let stream = s.streams.entry(*conv).or_default();
                let replayed: Vec<u64> = (*from..=*upto).collect();
                if stream.msgs != replayed {
                    return Err(format!("{to:?}: {frame:?} after the messages {:?}", stream.msgs));
                }
                stream.last = Some(*upto);
                return Ok(());
            }
            _ => return Ok(()),
        };
        let stream = s.streams.entry(conv).or_default();
        if let Event::Msg(_) = frame.body {
            stream.msgs.push(seq);
        }
        match stream.last {
            Some(last) if seq <= last => {
                return Err(format!("{to:?}: {frame:?} after seq {last} of {conv}: out of order or twice"));
            }
            // A visitor takes part in its conversation throughout: once its
            // stream has started, nothing of it may be missing.
            Some(last) if visitor && seq != last + 1 => {
                return Err(format!("{to:?}: visitor got seq {seq} of {conv} after {last}: a gap"));
            }
            _ => {}
        }
        stream.last = Some(seq);
        Ok(())
    }

    /// What must hold once the simulation is quiet: every command of a
    /// session still open answered, and every open visitor session that
    /// follows a conversation has all of it.
    pub fn quiet(&self) -> Result<(), Violation> {
        let mut report = String::new();
        for (addr, s) in &self.sessions {
            if s.ended || !s.connected {
                continue;
            }
            for id in &s.asked {
                if !s.answered.contains(id) {
                    let _ = write!(report, "{addr:?}: command {id} never answered; ");
                }
            }
            if s.who.as_ref().is_some_and(|w| w.role == Role::Visitor) {
                for (conv, stream) in &s.streams {
                    let stored = self.logs.get(conv).map_or(0, |l| l.messages.len() as u64);
                    if let Some(last) = stream.last
                        && last != stored
                    {
                        let _ = write!(report, "{addr:?}: {conv} ends at {last} but {stored} are stored; ");
                    }
                }
            }
        }
        if report.is_empty() { Ok(()) } else { Err(report) }
    }
}

/// Whether `who` may read the conversation in `state`
/// (`Conversation::may_read`, from the stored state).
fn member(state: &ConvState, who: &Who) -> bool {
    match who.role {
        Role::Visitor => *who.id == *state.visitor_id,
        Role::Agent => match state.status {
            ConvStatus::Queued => state.group.as_deref().is_some_and(|g| serves(&who.groups, g)),
            ConvStatus::Assigned | ConvStatus::Closed => {
                state.agent.as_ref().is_some_and(|a| *a.id == *who.id)
            }
        },
        Role::Bot => false,
    }
}

/// The conversation a frame is about, if one.
fn conv_of(frame: &ServerFrame) -> Option<ConvId> {
    match &frame.body {
        Event::Msg(m) => Some(m.conv),
        Event::Conversation { conv, .. }
        | Event::Ack { conv, .. }
        | Event::Read { conv, .. }
        | Event::Typing { conv, .. }
        | Event::History { conv, .. }
        | Event::Resumed { conv, .. } => Some(*conv),
        _ => None,
    }
}
