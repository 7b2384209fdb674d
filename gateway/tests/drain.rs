//! A graceful stop, against the real binary: `SIGTERM` under load answers
//! every command the gateway read, and leaves a store the next start finds
//! clean.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Gateway, WsClient};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const VISITORS: usize = 16;
const SENDS_MAX: i64 = 400;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// What one visitor saw of the stop: the seq of each `send` (by its
/// command id) that was acked, the ids answered otherwise, and the close.
#[derive(Debug, Default)]
struct Seen {
    acked: BTreeMap<i64, u64>,
    refused: Vec<i64>,
    sent: i64,
    close: Option<u16>,
}

/// Sends `send`s without waiting for their acks, one every 2 ms, and reads
/// every reply, until the gateway closes the connection.
async fn pipeline(c: WsClient, conv: String) -> Seen {
    let (mut tx, mut rx) = c.ws.split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        for id in 1..=SENDS_MAX {
            let q = json!({"type": "send", "id": id, "conv": conv, "cid": format!("c{id}"), "text": "load"});
            if tx.send(Message::text(q.to_string())).await.is_err() {
                break;
            }
            sent = id;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        sent
    });
    let mut seen = Seen::default();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(15), rx.next()).await {
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                let Some(id) = v["id"].as_i64() else { continue };
                match v["type"].as_str() {
                    Some("ack") => {
                        seen.acked.insert(id, v["seq"].as_u64().unwrap());
                    }
                    _ => seen.refused.push(id),
                }
            }
            Message::Close(frame) => {
                seen.close = frame.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    seen.sent = writer.await.unwrap();
    seen
}

/// Finding 6 of issue 10: after `SIGTERM` the process stopped within 2 ms,
/// never closing its store, and the next start reported
/// `unclean_shutdown=true`, every time.
#[test]
fn sigterm_under_load_answers_every_command_read_and_leaves_a_clean_store() {
    let env = [("KEFU_LIMITS_MESSAGES_PER_S", "100000"), ("KEFU_LIMITS_BURST", "100000")];
    let mut gw = Gateway::start(&["--shards", "2"], &env);
    let rt = rt();
    let visitors: Vec<(WsClient, String, String, String)> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..VISITORS {
            let mut c = WsClient::open(&gw, Duration::from_secs(10)).await;
            let connected = c.call(json!({"type": "connect"})).await;
            let id = connected["user"]["id"].as_str().unwrap().to_string();
            let key = connected["visitor_key"].as_str().unwrap().to_string();
            let conv = c.call(json!({"type": "open"})).await["conv"].as_str().unwrap().to_string();
            out.push((c, id, key, conv));
        }
        out
    });
    let mut creds = Vec::new();
    let seen: Vec<Seen> = rt.block_on(async {
        let mut tasks = Vec::new();
        for (c, id, key, conv) in visitors {
            creds.push((id, key, conv.clone()));
            tasks.push(tokio::spawn(pipeline(c, conv)));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        gw.terminate();
        let mut seen = Vec::new();
        for t in tasks {
            seen.push(t.await.unwrap());
        }
        seen
    });
    let status = gw.wait_exit(Duration::from_secs(15)).expect("kefu exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");

    let mut total = 0;
    for (v, s) in seen.iter().enumerate() {
        assert_eq!(s.close, Some(4000), "visitor {v}: {s:?}");
        assert!(s.refused.is_empty(), "visitor {v}: refused {:?}", s.refused);
        // What the gateway read it answered: the acks are a prefix of the
        // sends, with no send left unanswered before the last one answered.
        let answered: Vec<i64> = s.acked.keys().copied().collect();
        assert_eq!(
            answered,
            (1..=answered.len() as i64).collect::<Vec<_>>(),
            "visitor {v}: acks {answered:?}"
        );
        assert!(s.sent as usize > answered.len(), "visitor {v}: the stop came after every send ({s:?})");
        total += answered.len();
    }
    assert!(total > VISITORS * 10, "too little load to mean anything: {total} acks");

    // The next start finds the store closed cleanly, and holds exactly
    // what was acked.
    let gw = gw.kill9_and_restart(&["--shards", "2"], &env);
    let opened = gw.startup_log.iter().find(|l| l.contains("store open")).expect("a store open line");
    assert!(opened.contains("unclean_shutdown=false"), "{opened}");
    rt.block_on(async {
        for ((id, key, conv), s) in creds.iter().zip(&seen) {
            let mut c = WsClient::open(&gw, Duration::from_secs(10)).await;
            let connected = c.call(json!({"type": "connect", "visitor_id": id, "visitor_key": key})).await;
            assert_eq!(connected["type"], "connected", "{connected}");
            let page = c.call(json!({"type": "history", "conv": conv, "limit": 200})).await;
            let stored: Vec<(u64, String)> = page["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| (m["seq"].as_u64().unwrap(), m["cid"].as_str().unwrap().to_string()))
                .collect();
            let acked: Vec<(u64, String)> =
                s.acked.iter().map(|(id, seq)| (*seq, format!("c{id}"))).collect();
            // The newest page (200) shows that nothing past the last ack was
            // stored, and (with fewer acks than a page) that none is missing.
            assert_eq!(stored.len(), acked.len().min(200), "{conv}");
            assert_eq!(stored, acked[acked.len() - stored.len()..], "{conv}: stored is not what was acked");
        }
    });
}
