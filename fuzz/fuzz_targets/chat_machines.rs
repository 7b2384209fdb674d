//! The chat machines (edge, home, router, directory) of 2–3 shards in
//! memory (`kefu_core::chat::sim`), driven by a sequence of actions the
//! input decodes to: clients connect, resume, send, read, type, page
//! history, open, accept, transfer, close and go; shards handle their
//! inbox's oldest message in an order the input picks; storage commits,
//! fails and completes each shard's writes when the input says; time
//! passes. After every action, and once everything has run to its end,
//! `kefu_core::chat::sim::check` holds the run to the protocol's rules: no
//! panic; a client hears of a conversation only while a member of it; a
//! message or ack only once durable, and as stored; each conversation's
//! messages reach a session in seq order, a visitor's without a gap;
//! stored seqs are gap-free and the home never hands out one that is not
//! the next; a closed conversation stays closed; `connected` comes first;
//! every command is answered once. A broken rule panics with the actions.
//!
//! How the input decodes: `kefu_core::chat::sim::script::decode` (kept in
//! core, so that a test there replays a finding from its bytes).
#![no_main]

use kefu_core::chat::sim::script::{World, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (shards, flags, actions) = decode(data);
    let mut world = World::new(shards, flags);
    if let Err(violation) = world.run(&actions) {
        panic!("{violation}\nshards {shards}, flags {flags}, actions {actions:#?}");
    }
});
