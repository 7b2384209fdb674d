//! The durable log on redb: append with group commit, the per-conversation
//! index, users, blobs, consumer offsets and crash recovery.
