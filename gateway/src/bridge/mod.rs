//! The bridge: the control plane for business systems. For now, its
//! contract: the `kefu.v1` messages and services generated from
//! `proto/kefu/v1` ([`pb`]) and how they look as JSON ([`json`]), and the
//! API keys its calls will need ([`auth`]).

pub mod auth;
pub mod json;
pub mod pb;
