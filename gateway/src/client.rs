//! The client protocol endpoint `/ws`, as far as the data plane goes.
//!
//! The chat core (conversations, routing, the durable log) is the next
//! piece of work; until it lands, `/ws` speaks only the transport-level
//! commands of the protocol: `{"type":"ping"}` gets `{"type":"pong"}`, and
//! every other command gets a retryable `error {code: "unavailable"}` so a
//! client can tell "not yet" from "malformed".

use serde::Deserialize;

use crate::ws::decoder::DataKind;

#[derive(Deserialize)]
struct Command<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    id: Option<i64>,
}

/// The reply to one client message, as a JSON text frame payload.
pub fn handle(payload: &[u8], kind: DataKind) -> String {
    if matches!(kind, DataKind::Binary) {
        return error(None, "bad_frame", "binary frames need the kefu.v1.fb subprotocol, not served yet");
    }
    let cmd: Command = match serde_json::from_slice(payload) {
        Ok(cmd) => cmd,
        Err(e) => return error(None, "bad_frame", &format!("not a JSON command object: {e}")),
    };
    match cmd.kind {
        "ping" => match cmd.id {
            Some(id) => format!(r#"{{"type":"pong","id":{id}}}"#),
            None => r#"{"type":"pong"}"#.to_string(),
        },
        other => error(cmd.id, "unavailable", &format!("command {other:?} is not served by this build yet")),
    }
}

fn error(id: Option<i64>, code: &str, message: &str) -> String {
    let message = serde_json::Value::String(message.to_string());
    match id {
        Some(id) => format!(r#"{{"type":"error","id":{id},"code":"{code}","message":{message}}}"#),
        None => format!(r#"{{"type":"error","code":"{code}","message":{message}}}"#),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pongs_with_its_id() {
        assert_eq!(handle(br#"{"type":"ping"}"#, DataKind::Text), r#"{"type":"pong"}"#);
        assert_eq!(handle(br#"{"type":"ping","id":7}"#, DataKind::Text), r#"{"type":"pong","id":7}"#);
    }

    #[test]
    fn anything_else_is_a_clear_error() {
        let r: serde_json::Value =
            serde_json::from_str(&handle(br#"{"type":"send","id":3}"#, DataKind::Text)).unwrap();
        assert_eq!(r["type"], "error");
        assert_eq!(r["code"], "unavailable");
        assert_eq!(r["id"], 3);
        let r: serde_json::Value = serde_json::from_str(&handle(b"nope", DataKind::Text)).unwrap();
        assert_eq!(r["code"], "bad_frame");
        let r: serde_json::Value = serde_json::from_str(&handle(b"\x01", DataKind::Binary)).unwrap();
        assert_eq!(r["code"], "bad_frame");
    }
}
