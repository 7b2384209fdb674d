//! How the contract's messages look as JSON (REST answers and bodies).
//!
//! The REST API answers with the very prost messages the gRPC API answers
//! with, serialized by serde (derived in `build.rs`), so the two cannot
//! drift apart. The one field serde cannot spell as a client expects is
//! `bytes`: attachments are base64, as in the WebSocket protocol.

/// `#[serde(with = "base64")]` for a `bytes` field: standard base64 with
/// padding, as the WebSocket protocol's `attachment.data`.
pub mod base64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the bytes as one base64 string.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    /// Reads one base64 string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use crate::bridge::pb;

    #[test]
    fn attachments_are_base64_both_ways() {
        let a = pb::Attachment { mime: "image/png".into(), data: vec![0, 1, 2, 255] };
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(text, r#"{"mime":"image/png","data":"AAEC/w=="}"#);
        assert_eq!(serde_json::from_str::<pb::Attachment>(&text).unwrap(), a);
        assert!(serde_json::from_str::<pb::Attachment>(r#"{"data":"not base64!"}"#).is_err());
    }

    #[test]
    fn absent_fields_take_their_defaults() {
        let r: pb::GetHistoryRequest = serde_json::from_str(r#"{"conv":"c1"}"#).unwrap();
        assert_eq!(r, pb::GetHistoryRequest { conv: "c1".into(), before: 0, limit: 0 });
    }
}
