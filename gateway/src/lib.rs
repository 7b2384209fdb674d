//! kefu's gateway: the process that holds every visitor's and agent's
//! WebSocket.
//!
//! The binary (`kefu`) is a thin shell over this library so that tests and
//! benchmarks reach the same code: [`config`] reads the configuration,
//! [`server`] starts one [`shard`] per core, each shard serves its
//! connections ([`conn`]) with the sans-IO [`ws`] codec and [`http`] parser (and learn the
//! client's address from [`client_ip`]),
//! and keeps its message buffers in a [`slab`]. The [`bridge`] thread serves
//! business systems and operators: gRPC, REST, health and metrics.

pub mod alloc;
pub mod assets;
pub mod batch;
pub mod bridge;
pub mod chat;
pub mod client_ip;
pub mod config;
pub mod conn;
pub mod http;
pub mod mailbox;
pub mod metrics;
pub mod page_blocks;
pub mod proxy_protocol;
pub mod secret;
pub mod server;
pub mod shard;
pub mod slab;
pub mod ws;
