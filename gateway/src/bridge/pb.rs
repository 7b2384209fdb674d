//! The control plane's contract, generated from `proto/kefu/v1/*.proto` by
//! `gateway/build.rs` (prost and tonic). Generated code: edit the `.proto`
//! files, not this.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("kefu.v1");

/// The encoded `FileDescriptorSet` of the contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kefu_v1_descriptor");
