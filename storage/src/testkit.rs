//! Helpers for the crate's own tests: a store in a temporary directory,
//! messages, and waiting for completions with a deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kefu_proto::ids::Role;

use kefu_proto::ConvId;
use kefu_proto::client::{Msg, Sender};

use crate::{Completion, Completions, Notify, Recovery, Store, StoreConfig, WriteOp};

/// How long a test waits for something that should take milliseconds.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

/// Counts `notify` calls per source.
#[derive(Default)]
pub(crate) struct NotifyCount(pub(crate) [AtomicUsize; 8]);

impl NotifyCount {
    pub(crate) fn notify(self: &Arc<Self>) -> Notify {
        let me = self.clone();
        Arc::new(move |source| {
            me.0[source].fetch_add(1, Ordering::Relaxed);
        })
    }
}

pub(crate) fn config(dir: &std::path::Path) -> StoreConfig {
    // A small log: each test's store fills its file with zeros once.
    StoreConfig {
        dir: dir.to_path_buf(),
        cache_bytes: 16 << 20,
        wal_bytes: 1 << 20,
        ..StoreConfig::default()
    }
}

pub(crate) fn open(config: StoreConfig) -> (Store, Recovery) {
    Store::open(config, Arc::new(|_| {})).expect("open store")
}

pub(crate) fn message(conv: u64, sender: &str, cid: &str, text: &str) -> Msg {
    Msg {
        conv: ConvId(conv),
        seq: 0,
        cid: cid.to_string(),
        from: Sender { role: Role::Visitor, id: sender.to_string(), name: format!("{sender}'s name") },
        ts: 1_700_000_000_000,
        text: Some(text.to_string()),
        attachment: None,
    }
}

/// Pops `n` completions, waiting at most [`PATIENCE`].
pub(crate) fn wait_for(completions: &Completions, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + PATIENCE;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match completions.pop() {
            Some(c) => out.push(c),
            None if Instant::now() > deadline => {
                panic!("waited {PATIENCE:?} for {n} completions, got {}", out.len())
            }
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    out
}

/// Submits one write on source 0 and waits for its completion.
pub(crate) fn write(store: &Store, token: u64, op: WriteOp) -> Completion {
    store.writer().submit(0, token, op).expect("submit");
    let mut c = wait_for(&store.completions(0), 1);
    let c = c.pop().expect("one completion");
    assert_eq!(c.token, token);
    c
}

/// A message record with every field set: an agent's text with an
/// attachment.
pub(crate) fn message_record() -> crate::MessageRecord {
    crate::MessageRecord {
        conv: 7,
        seq: 3,
        cid: "cid-1".into(),
        from: crate::Sender { role: Role::Agent, id: "a1".into(), name: "Alice".into() },
        ts_ms: 1_700_000_000_000,
        text: Some("你好, how can I help?".into()),
        attachment: Some(crate::Attachment { mime: "image/png".into(), bytes: vec![0x89, b'P', b'N', b'G'] }),
    }
}

/// `n` copies of `bytes`, each with one bit flipped past the format byte,
/// at places drawn from a fixed xorshift sequence (the same every run).
pub(crate) fn bit_flips(bytes: &[u8], n: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
    (0..n).map(move |_| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let mut b = bytes.to_vec();
        let i = 1 + (rng_state as usize) % (b.len() - 1);
        b[i] ^= 1 << (rng_state >> 59 & 7);
        b
    })
}
