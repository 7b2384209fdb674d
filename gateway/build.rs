//! Compiles the control plane's contract (`proto/kefu/v1/*.proto`) into
//! Rust with prost and tonic, and writes its file descriptor set for
//! server reflection.
//!
//! The contract is compiled here rather than in `kefu-proto` because the
//! generated services need tonic (and through it tokio and hyper), and
//! `kefu-core`, which depends on `kefu-proto`, must stay free of IO.
//! protoc comes from `protoc-bin-vendored`: no system protoc is needed.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "../proto/kefu/v1/common.proto",
    "../proto/kefu/v1/gateway.proto",
    "../proto/kefu/v1/events.proto",
    "../proto/kefu/v1/hooks.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: set_var is unsound only with other threads reading the
    // environment; a build script's main runs before it starts any.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("kefu_v1_descriptor.bin"))
        // Maps in a stable order, so JSON answers are reproducible.
        .btree_map(".")
        // REST answers are these very messages as JSON, so the two APIs
        // cannot drift apart.
        .type_attribute(".kefu.v1", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".kefu.v1", "#[serde(default)]")
        // A oneof's case is named as in the .proto (`"message"`), as
        // protobuf's JSON mapping names it, not as the Rust variant.
        .enum_attribute(".kefu.v1.Event.kind", "#[serde(rename_all = \"snake_case\")]")
        .field_attribute(".kefu.v1.Attachment.data", "#[serde(with = \"crate::bridge::json::base64\")]")
        .compile_protos(PROTOS, &["../proto"])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
