//! Tests across both encodings: every command and event round-trips through
//! each, the PROTOCOL.md spellings decode and encode literally, every
//! decoding error has the right code, message and id, hostile FlatBuffers
//! never panic, and encoding the per-message events allocates nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use super::*;

// ---- fixtures ----------------------------------------------------------------

fn c(n: u64) -> ConvId {
    ConvId(n)
}

fn meta(pairs: &[(&str, &str)]) -> Meta {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn all_bytes() -> Vec<u8> {
    (0..=255u8).collect()
}

fn sample_msg(seq: u64) -> Msg {
    Msg {
        conv: c(42),
        seq,
        cid: format!("m-{seq}"),
        from: Sender { role: Role::Visitor, id: "v_9f2".into(), name: "Guest \"9\"".into() },
        text: Some(format!("hello #{seq} — 你好 \n\t\u{1}")),
        attachment: None,
        ts: 1_767_225_600_000 + seq,
    }
}

/// Every command, in its plain and its fullest form.
fn commands() -> Vec<ClientFrame> {
    let f = |id, body| ClientFrame { id, body };
    vec![
        f(
            Some(1),
            Command::Connect { token: None, visitor_id: None, visitor_key: None, resume: BTreeMap::new() },
        ),
        f(
            Some(2),
            Command::Connect {
                token: Some("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhMSJ9.sig".into()),
                visitor_id: Some("v_123".into()),
                visitor_key: Some("3q2+7w==".into()),
                resume: [(c(1), 0), (c(42), 17), (c(u64::MAX), u64::MAX)].into_iter().collect(),
            },
        ),
        f(None, Command::Open { group: None, meta: Meta::new() }),
        f(
            Some(3),
            Command::Open {
                group: Some("billing".into()),
                meta: meta(&[("vip_level", "3"), ("plan", "pro")]),
            },
        ),
        f(
            Some(4),
            Command::Send { conv: c(42), cid: "m-1".into(), text: Some("hi".into()), attachment: None },
        ),
        f(
            Some(-5),
            Command::Send {
                conv: c(42),
                cid: "x".repeat(CID_BYTES_MAX),
                text: Some("see \"attached\"\\".into()),
                attachment: Some(Attachment { mime: "application/octet-stream".into(), data: all_bytes() }),
            },
        ),
        f(
            None,
            Command::Send {
                conv: c(0),
                cid: "m-3".into(),
                text: None,
                attachment: Some(Attachment { mime: "image/png".into(), data: Vec::new() }),
            },
        ),
        f(Some(6), Command::Read { conv: c(42), seq: 12 }),
        f(None, Command::Typing { conv: c(42) }),
        f(Some(7), Command::History { conv: c(42), before: None, limit: None }),
        f(Some(8), Command::History { conv: c(42), before: Some(100), limit: Some(20) }),
        f(Some(9), Command::Presence { status: PresenceStatus::Online, capacity: Some(5) }),
        f(Some(10), Command::Presence { status: PresenceStatus::Offline, capacity: None }),
        f(Some(11), Command::Accept { conv: c(7) }),
        f(Some(12), Command::Transfer { conv: c(7), to: TransferTarget::Agent("a2".into()) }),
        f(Some(13), Command::Transfer { conv: c(7), to: TransferTarget::Group("vip".into()) }),
        f(Some(14), Command::Close { conv: c(7) }),
        f(Some(i64::MAX), Command::Ping),
        f(None, Command::Ping),
        f(Some(12), Command::Canned),
    ]
}

/// Every event, in its plain and its fullest form.
fn events() -> Vec<ServerFrame> {
    let f = |id, body| ServerFrame { id, body };
    let visitor = User { id: "v_9f2".into(), name: "Guest 9".into(), meta: meta(&[("vip_level", "2")]) };
    vec![
        f(
            Some(1),
            Event::Connected {
                session: "s-1".into(),
                role: Role::Visitor,
                user: User { id: "v_9f2".into(), name: String::new(), meta: Meta::new() },
                visitor_key: Some("k".repeat(22)),
                conversations: Vec::new(),
                heartbeat_s: 30,
                text_bytes_max: None,
                attachment_bytes_max: None,
                groups: None,
            },
        ),
        f(
            Some(2),
            Event::Connected {
                session: "s-2".into(),
                role: Role::Agent,
                user: User { id: "a1".into(), name: "Alice".into(), meta: meta(&[("team", "eu")]) },
                visitor_key: None,
                conversations: vec![
                    ConvSummary { conv: c(1), status: ConvStatus::Assigned, last_seq: 10 },
                    ConvSummary { conv: c(2), status: ConvStatus::Queued, last_seq: 0 },
                    ConvSummary { conv: c(3), status: ConvStatus::Closed, last_seq: 99 },
                ],
                heartbeat_s: 15,
                text_bytes_max: Some(16_384),
                attachment_bytes_max: Some(u32::MAX),
                groups: Some(vec!["sales".into(), "售后".into()]),
            },
        ),
        f(
            Some(3),
            Event::Conversation {
                conv: c(42),
                status: ConvStatus::Queued,
                agent: None,
                group: Some("billing".into()),
                visitor: visitor.clone(),
                queue_position: Some(3),
                agents_online: Some(false),
                since: Some(1_767_225_600_000),
            },
        ),
        f(
            None,
            Event::Conversation {
                conv: c(42),
                status: ConvStatus::Assigned,
                agent: Some(AgentRef { id: "a1".into(), name: "Alice".into() }),
                group: None,
                visitor,
                queue_position: None,
                agents_online: None,
                since: None,
            },
        ),
        f(
            Some(4),
            Event::Ack { cid: "m-1".into(), conv: c(42), seq: 12, ts: 1_767_225_600_000, duplicate: false },
        ),
        f(
            Some(4),
            Event::Ack { cid: "m-1".into(), conv: c(42), seq: 12, ts: 1_767_225_600_000, duplicate: true },
        ),
        f(None, Event::Msg(sample_msg(12))),
        f(
            None,
            Event::Msg(Msg {
                from: Sender { role: Role::Bot, id: "hook".into(), name: "Auto-reply".into() },
                text: None,
                attachment: Some(Attachment { mime: "image/png".into(), data: all_bytes() }),
                ..sample_msg(13)
            }),
        ),
        f(None, Event::Read { conv: c(42), seq: 12, by: "a1".into() }),
        f(None, Event::Typing { conv: c(42), by: "v_9f2".into() }),
        f(Some(5), Event::History { conv: c(42), messages: Vec::new() }),
        f(Some(6), Event::History { conv: c(42), messages: (1..=3).map(sample_msg).collect() }),
        f(None, Event::Resumed { conv: c(42), from: 11, to: 12 }),
        f(None, Event::Resumed { conv: c(42), from: 13, to: 12 }),
        f(Some(7), Event::Presence { agent: "a1".into(), status: PresenceStatus::Away, name: None }),
        f(
            None,
            Event::Presence {
                agent: "a2".into(), status: PresenceStatus::Online, name: Some("小李".into())
            },
        ),
        f(Some(8), Event::Error { code: ErrorCode::NotFound, message: "no such conversation: c9".into() }),
        f(None, Event::Error { code: ErrorCode::Internal, message: String::new() }),
        f(Some(9), Event::Pong),
        f(Some(10), Event::Canned { replies: Vec::new() }),
        f(
            Some(11),
            Event::Canned {
                replies: vec![
                    CannedReply { name: "greeting".into(), text: "您好！\n\"Hello\"".into() },
                    CannedReply { name: "bye".into(), text: String::new() },
                ],
            },
        ),
    ]
}

// ---- round trips -----------------------------------------------------------------

#[test]
fn every_command_round_trips_in_both_encodings() {
    let mut enc = Encoder::new();
    let mut seen = std::collections::BTreeSet::new();
    for frame in commands() {
        seen.insert(frame.body.name());
        for codec in Codec::ALL {
            let bytes = codec.encode_client(&frame, &mut enc).to_vec();
            let back = codec.decode_client(&bytes).unwrap_or_else(|e| panic!("{codec:?} {frame:?}: {e}"));
            assert_eq!(back, frame, "{codec:?}");
        }
    }
    assert_eq!(seen.len(), 12, "every command type is covered: {seen:?}");
}

#[test]
fn every_event_round_trips_in_both_encodings() {
    let mut enc = Encoder::new();
    let mut seen = std::collections::BTreeSet::new();
    for frame in events() {
        seen.insert(frame.body.name());
        for codec in Codec::ALL {
            let bytes = codec.encode_server(&frame, &mut enc).to_vec();
            let back = codec.decode_server(&bytes).unwrap_or_else(|e| panic!("{codec:?} {frame:?}: {e}"));
            assert_eq!(back, frame, "{codec:?}");
        }
    }
    assert_eq!(seen.len(), 12, "every event type is covered: {seen:?}");
}

#[test]
fn json_output_is_valid_json_with_type_first_and_id_second() {
    let mut out = Vec::new();
    let check = |out: &[u8], name: &str, id: Option<i64>| {
        let text = std::str::from_utf8(out).unwrap();
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(text.starts_with(&format!("{{\"type\":\"{name}\"")), "{text}");
        match id {
            Some(id) => assert!(text[name.len() + 10..].starts_with(&format!(",\"id\":{id}")), "{text}"),
            None => assert!(v.get("id").is_none(), "{text}"),
        }
        // Absent optionals are omitted, never null.
        assert!(!text.contains("null"), "{text}");
    };
    for frame in events() {
        out.clear();
        json::encode_server(&frame, &mut out);
        check(&out, frame.body.name(), frame.id);
    }
    for frame in commands() {
        out.clear();
        json::encode_client(&frame, &mut out);
        check(&out, frame.body.name(), frame.id);
    }
}

#[test]
fn json_encoding_appends_to_what_is_in_the_buffer() {
    let mut out = b"prefix".to_vec();
    json::encode_server(&ServerFrame::push(Event::Pong), &mut out);
    json::encode_server(&ServerFrame::reply(Some(3), Event::Pong), &mut out);
    assert_eq!(out, b"prefix{\"type\":\"pong\"}{\"type\":\"pong\",\"id\":3}");
}

#[test]
fn the_same_builder_and_buffer_encode_frame_after_frame() {
    let mut enc = Encoder::new();
    let frames = events();
    // Largest first, so later frames are built over leftovers of bigger ones.
    for frame in frames.iter().rev().chain(frames.iter()) {
        for codec in Codec::ALL {
            let bytes = codec.encode_server(frame, &mut enc).to_vec();
            assert_eq!(&codec.decode_server(&bytes).unwrap(), frame);
        }
    }
}

// ---- PROTOCOL.md, literally ----------------------------------------------------------

/// Commands as a client following PROTOCOL.md writes them.
#[test]
fn json_commands_spelled_as_in_protocol_md() {
    let cases: &[(&str, ClientFrame)] = &[
        (r#"{"type":"ping"}"#, ClientFrame { id: None, body: Command::Ping }),
        (
            r#"{"type":"connect","id":1,"token":"eyJ.x.y"}"#,
            ClientFrame {
                id: Some(1),
                body: Command::Connect {
                    token: Some("eyJ.x.y".into()),
                    visitor_id: None,
                    visitor_key: None,
                    resume: BTreeMap::new(),
                },
            },
        ),
        (
            r#"{"type":"connect","visitor_id":"v_1","visitor_key":"abc","resume":{"c42":11,"c7":0}}"#,
            ClientFrame {
                id: None,
                body: Command::Connect {
                    token: None,
                    visitor_id: Some("v_1".into()),
                    visitor_key: Some("abc".into()),
                    resume: [(c(42), 11), (c(7), 0)].into_iter().collect(),
                },
            },
        ),
        (
            r#"{"type":"open","id":2,"group":"billing","meta":{"vip_level":"3","plan":"pro"}}"#,
            ClientFrame {
                id: Some(2),
                body: Command::Open {
                    group: Some("billing".into()),
                    meta: meta(&[("vip_level", "3"), ("plan", "pro")]),
                },
            },
        ),
        (
            r#"{"type":"send","id":3,"conv":"c42","cid":"m-1","text":"hi"}"#,
            ClientFrame {
                id: Some(3),
                body: Command::Send {
                    conv: c(42),
                    cid: "m-1".into(),
                    text: Some("hi".into()),
                    attachment: None,
                },
            },
        ),
        (
            r#"{"type":"send","conv":"c42","cid":"m-2","attachment":{"mime":"text/plain","data":"aGk="}}"#,
            ClientFrame {
                id: None,
                body: Command::Send {
                    conv: c(42),
                    cid: "m-2".into(),
                    text: None,
                    attachment: Some(Attachment { mime: "text/plain".into(), data: b"hi".to_vec() }),
                },
            },
        ),
        (
            r#"{"type":"read","conv":"c42","seq":12}"#,
            ClientFrame { id: None, body: Command::Read { conv: c(42), seq: 12 } },
        ),
        (
            r#"{"type":"typing","conv":"c42"}"#,
            ClientFrame { id: None, body: Command::Typing { conv: c(42) } },
        ),
        (
            r#"{"type":"history","id":4,"conv":"c42","before":100,"limit":20}"#,
            ClientFrame {
                id: Some(4),
                body: Command::History { conv: c(42), before: Some(100), limit: Some(20) },
            },
        ),
        (
            r#"{"type":"presence","id":5,"status":"online","capacity":5}"#,
            ClientFrame {
                id: Some(5),
                body: Command::Presence { status: PresenceStatus::Online, capacity: Some(5) },
            },
        ),
        (
            r#"{"type":"presence","status":"away"}"#,
            ClientFrame {
                id: None,
                body: Command::Presence { status: PresenceStatus::Away, capacity: None },
            },
        ),
        (
            r#"{"type":"accept","conv":"c42"}"#,
            ClientFrame { id: None, body: Command::Accept { conv: c(42) } },
        ),
        (
            r#"{"type":"transfer","conv":"c42","to":"a2"}"#,
            ClientFrame {
                id: None,
                body: Command::Transfer { conv: c(42), to: TransferTarget::Agent("a2".into()) },
            },
        ),
        (
            r#"{"type":"transfer","conv":"c42","to":"group:billing"}"#,
            ClientFrame {
                id: None,
                body: Command::Transfer { conv: c(42), to: TransferTarget::Group("billing".into()) },
            },
        ),
        (r#"{"type":"close","conv":"c42"}"#, ClientFrame { id: None, body: Command::Close { conv: c(42) } }),
    ];
    for (text, want) in cases {
        assert_eq!(&json::decode_client(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}")), want);
        // And our own encoding of it is the same text (field order included).
        let mut out = Vec::new();
        json::encode_client(want, &mut out);
        let ours = String::from_utf8(out).unwrap();
        let resume_reordered = text.contains("resume"); // a map: ours is sorted by conv id
        if !resume_reordered && !text.contains("meta") {
            assert_eq!(&ours, text);
        }
    }
}

/// Events exactly as the gateway writes them: field names and order pinned.
#[test]
fn json_events_spelled_as_in_protocol_md() {
    let cases: Vec<(ServerFrame, &str)> = vec![
        (ServerFrame::push(Event::Pong), r#"{"type":"pong"}"#),
        (ServerFrame::reply(Some(9), Event::Pong), r#"{"type":"pong","id":9}"#),
        (
            ServerFrame::reply(
                Some(1),
                Event::Connected {
                    session: "s-1".into(),
                    role: Role::Visitor,
                    user: User { id: "v_1".into(), name: "".into(), meta: Meta::new() },
                    visitor_key: Some("k1".into()),
                    conversations: vec![ConvSummary { conv: c(42), status: ConvStatus::Queued, last_seq: 3 }],
                    heartbeat_s: 30,
                    text_bytes_max: Some(16384),
                    attachment_bytes_max: Some(1048576),
                    groups: None,
                },
            ),
            r#"{"type":"connected","id":1,"session":"s-1","role":"visitor","user":{"id":"v_1","name":"","meta":{}},"visitor_key":"k1","conversations":[{"conv":"c42","status":"queued","last_seq":3}],"heartbeat_s":30,"text_bytes_max":16384,"attachment_bytes_max":1048576}"#,
        ),
        (
            ServerFrame::reply(
                Some(2),
                Event::Connected {
                    session: "s-2".into(),
                    role: Role::Agent,
                    user: User { id: "a1".into(), name: "Alice".into(), meta: Meta::new() },
                    visitor_key: None,
                    conversations: Vec::new(),
                    heartbeat_s: 30,
                    text_bytes_max: None,
                    attachment_bytes_max: None,
                    groups: Some(vec!["sales".into(), "billing".into()]),
                },
            ),
            r#"{"type":"connected","id":2,"session":"s-2","role":"agent","user":{"id":"a1","name":"Alice","meta":{}},"conversations":[],"heartbeat_s":30,"groups":["sales","billing"]}"#,
        ),
        (
            ServerFrame::push(Event::Conversation {
                conv: c(42),
                status: ConvStatus::Assigned,
                agent: Some(AgentRef { id: "a1".into(), name: "Alice".into() }),
                group: Some("billing".into()),
                visitor: User { id: "v_1".into(), name: "Bob".into(), meta: meta(&[("plan", "pro")]) },
                queue_position: None,
                agents_online: None,
                since: None,
            }),
            r#"{"type":"conversation","conv":"c42","status":"assigned","agent":{"id":"a1","name":"Alice"},"group":"billing","visitor":{"id":"v_1","name":"Bob","meta":{"plan":"pro"}}}"#,
        ),
        (
            ServerFrame::reply(
                Some(2),
                Event::Conversation {
                    conv: c(42),
                    status: ConvStatus::Queued,
                    agent: None,
                    group: None,
                    visitor: User { id: "v_1".into(), name: "Bob".into(), meta: Meta::new() },
                    queue_position: Some(1),
                    agents_online: Some(true),
                    since: Some(1_767_225_600_000),
                },
            ),
            r#"{"type":"conversation","id":2,"conv":"c42","status":"queued","visitor":{"id":"v_1","name":"Bob","meta":{}},"queue_position":1,"agents_online":true,"since":1767225600000}"#,
        ),
        (
            ServerFrame::reply(
                Some(3),
                Event::Ack { cid: "m-1".into(), conv: c(42), seq: 12, ts: 1700, duplicate: false },
            ),
            r#"{"type":"ack","id":3,"cid":"m-1","conv":"c42","seq":12,"ts":1700}"#,
        ),
        (
            ServerFrame::reply(
                Some(3),
                Event::Ack { cid: "m-1".into(), conv: c(42), seq: 12, ts: 1700, duplicate: true },
            ),
            r#"{"type":"ack","id":3,"cid":"m-1","conv":"c42","seq":12,"ts":1700,"duplicate":true}"#,
        ),
        (
            ServerFrame::push(Event::Msg(Msg {
                conv: c(42),
                seq: 12,
                cid: "m-1".into(),
                from: Sender { role: Role::Visitor, id: "v_1".into(), name: "Bob".into() },
                text: Some("hi".into()),
                attachment: None,
                ts: 1700,
            })),
            r#"{"type":"msg","conv":"c42","seq":12,"cid":"m-1","from":{"role":"visitor","id":"v_1","name":"Bob"},"text":"hi","ts":1700}"#,
        ),
        (
            ServerFrame::push(Event::Msg(Msg {
                conv: c(42),
                seq: 13,
                cid: "b-1".into(),
                from: Sender { role: Role::Bot, id: "hook".into(), name: "Bot".into() },
                text: None,
                attachment: Some(Attachment { mime: "text/plain".into(), data: b"hi".to_vec() }),
                ts: 1701,
            })),
            r#"{"type":"msg","conv":"c42","seq":13,"cid":"b-1","from":{"role":"bot","id":"hook","name":"Bot"},"attachment":{"mime":"text/plain","data":"aGk="},"ts":1701}"#,
        ),
        (
            ServerFrame::push(Event::Read { conv: c(42), seq: 12, by: "a1".into() }),
            r#"{"type":"read","conv":"c42","seq":12,"by":"a1"}"#,
        ),
        (
            ServerFrame::push(Event::Typing { conv: c(42), by: "a1".into() }),
            r#"{"type":"typing","conv":"c42","by":"a1"}"#,
        ),
        (
            ServerFrame::reply(
                Some(4),
                Event::History {
                    conv: c(42),
                    messages: vec![Msg {
                        conv: c(42),
                        seq: 1,
                        cid: "m-0".into(),
                        from: Sender { role: Role::Agent, id: "a1".into(), name: "Alice".into() },
                        text: Some("welcome".into()),
                        attachment: None,
                        ts: 1600,
                    }],
                },
            ),
            r#"{"type":"history","id":4,"conv":"c42","messages":[{"type":"msg","conv":"c42","seq":1,"cid":"m-0","from":{"role":"agent","id":"a1","name":"Alice"},"text":"welcome","ts":1600}]}"#,
        ),
        (
            ServerFrame::push(Event::Resumed { conv: c(42), from: 11, to: 12 }),
            r#"{"type":"resumed","conv":"c42","from":11,"to":12}"#,
        ),
        (
            ServerFrame::reply(
                Some(5),
                Event::Presence { agent: "a1".into(), status: PresenceStatus::Online, name: None },
            ),
            r#"{"type":"presence","id":5,"agent":"a1","status":"online"}"#,
        ),
        (
            ServerFrame::error(Some(6), ErrorCode::RateLimited, "slow down"),
            r#"{"type":"error","id":6,"code":"rate_limited","message":"slow down"}"#,
        ),
    ];
    for (frame, text) in cases {
        let mut out = Vec::new();
        json::encode_server(&frame, &mut out);
        assert_eq!(std::str::from_utf8(&out).unwrap(), text);
        assert_eq!(json::decode_server(text.as_bytes()).unwrap(), frame);
    }
}

#[test]
fn json_decoding_is_lenient_where_a_careful_client_expects() {
    let ok = |text: &str| json::decode_client(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
    // null is absent, for optional fields and the id alike.
    assert_eq!(
        ok(r#"{"type":"connect","id":null,"token":null,"resume":null}"#),
        ClientFrame {
            id: None,
            body: Command::Connect {
                token: None,
                visitor_id: None,
                visitor_key: None,
                resume: BTreeMap::new()
            }
        }
    );
    // Empty identity strings are absent too.
    assert_eq!(ok(r#"{"type":"connect","token":""}"#), ok(r#"{"type":"connect"}"#));
    assert_eq!(ok(r#"{"type":"open","group":""}"#), ok(r#"{"type":"open"}"#));
    // Unknown fields (a newer client) are ignored, however nested.
    assert_eq!(ok(r#"{"extra":{"a":[1,{"b":null}]},"type":"ping","v":2}"#).body, Command::Ping);
    // Fields in any order; the last of a repeated key wins (JSON.parse).
    assert_eq!(
        ok(r#"{"seq":1,"conv":"c1","type":"read","seq":2}"#).body,
        Command::Read { conv: c(1), seq: 2 }
    );
    // Whitespace anywhere JSON allows it.
    assert_eq!(ok(" {\n\"type\" : \"ping\" ,\t\"id\" : 7 }\r\n").id, Some(7));
    // Escapes in every string field.
    assert_eq!(
        ok(r#"{"type":"send","conv":"\u0063\u0034\u0032","cid":"a\"b","text":"\u4e2d\n\ud83c\udf89"}"#).body,
        Command::Send { conv: c(42), cid: "a\"b".into(), text: Some("中\n🎉".into()), attachment: None }
    );
    // An empty text beside an attachment is no text.
    let frame =
        ok(r#"{"type":"send","conv":"c1","cid":"x","text":"","attachment":{"mime":"a/b","data":""}}"#);
    assert!(matches!(frame.body, Command::Send { text: None, attachment: Some(_), .. }));
    // Base64 padding is optional on input.
    let frame = ok(r#"{"type":"send","conv":"c1","cid":"x","attachment":{"mime":"a/b","data":"aGk"}}"#);
    assert!(
        matches!(frame.body, Command::Send { attachment: Some(Attachment { ref data, .. }), .. } if data == b"hi")
    );
    // Extreme ids.
    assert_eq!(ok(r#"{"type":"ping","id":-9223372036854775808}"#).id, Some(i64::MIN));
    assert_eq!(ok(r#"{"type":"ping","id":9223372036854775807}"#).id, Some(i64::MAX));
}

#[test]
fn history_limit_defaults_to_50_and_is_clamped_to_200() {
    assert_eq!(history_limit(None), 50);
    assert_eq!(history_limit(Some(20)), 20);
    assert_eq!(history_limit(Some(200)), 200);
    assert_eq!(history_limit(Some(201)), 200);
    assert_eq!(history_limit(Some(u32::MAX)), 200);
    assert_eq!(history_limit(Some(0)), 0);
    let frame = json::decode_client(br#"{"type":"history","conv":"c1","limit":5000}"#).unwrap();
    assert_eq!(frame.body, Command::History { conv: c(1), before: None, limit: Some(5000) });
}

#[test]
fn attachment_bytes_travel_as_base64_in_json_and_raw_in_flatbuffers() {
    let mut enc = Encoder::new();
    for len in [0usize, 1, 2, 3, 4, 5, 255, 256, 4097] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let frame = ClientFrame {
            id: None,
            body: Command::Send {
                conv: c(1),
                cid: "a".into(),
                text: None,
                attachment: Some(Attachment { mime: "application/octet-stream".into(), data: data.clone() }),
            },
        };
        let text = Codec::Json.encode_client(&frame, &mut enc).to_vec();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let b64 = v["attachment"]["data"].as_str().unwrap();
        assert_eq!(b64.len(), len.div_ceil(3) * 4, "padded");
        assert_eq!(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap(), data);
        assert_eq!(Codec::Json.decode_client(&text).unwrap(), frame);

        let bin = Codec::FlatBuffers.encode_client(&frame, &mut enc).to_vec();
        if len > 8 {
            assert!(bin.windows(len).any(|w| w == data), "raw bytes in the buffer");
        }
        assert_eq!(Codec::FlatBuffers.decode_client(&bin).unwrap(), frame);
    }
    // The standard alphabet: `+` and `/`, not the URL-safe `-` and `_`.
    let ev = ServerFrame::push(Event::Msg(Msg {
        attachment: Some(Attachment { mime: "a/b".into(), data: vec![0xfb, 0xff] }),
        ..sample_msg(1)
    }));
    let mut out = Vec::new();
    json::encode_server(&ev, &mut out);
    assert!(std::str::from_utf8(&out).unwrap().contains(r#""data":"+/8=""#));
    let err = json::decode_client(
        br#"{"type":"send","conv":"c1","cid":"x","attachment":{"mime":"a/b","data":"-_8="}}"#,
    )
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadCommand);
    assert!(err.message.contains("attachment.data"), "{err}");
}

// ---- errors ---------------------------------------------------------------------

#[track_caller]
fn json_err(text: &[u8], code: ErrorCode, id: Option<i64>, needle: &str) {
    let err = json::decode_client(text).unwrap_err();
    let shown = String::from_utf8_lossy(text);
    assert_eq!(err.code, code, "{shown}: {err}");
    assert_eq!(err.id, id, "{shown}: {err}");
    assert!(err.message.contains(needle), "{shown}: {err:?} should mention {needle:?}");
}

#[test]
fn json_frames_that_are_not_commands_are_bad_frame() {
    use ErrorCode::BadFrame;
    json_err(b"\xff\xfe", BadFrame, None, "UTF-8");
    json_err(b"", BadFrame, None, "not JSON");
    json_err(b"hello", BadFrame, None, "not JSON");
    json_err(br#"{"type":"ping""#, BadFrame, None, "not JSON");
    json_err(br#"{"type":"ping"} {}"#, BadFrame, None, "not JSON");
    json_err(b"[1,2]", BadFrame, None, "not a JSON object");
    json_err(br#""ping""#, BadFrame, None, "not a JSON object");
    json_err(b"42", BadFrame, None, "not a JSON object");
    json_err(b"null", BadFrame, None, "not a JSON object");
    json_err(b"{}", BadFrame, None, "missing `type`");
    json_err(br#"{"id":3}"#, BadFrame, Some(3), "missing `type`");
    json_err(br#"{"type":null,"id":3}"#, BadFrame, Some(3), "missing `type`");
    json_err(br#"{"type":5,"id":3}"#, BadFrame, Some(3), "`type` must be a string");
    json_err(br#"{"type":"nope","id":4}"#, BadFrame, Some(4), r#"unknown command type "nope""#);
    json_err(br#"{"type":"PING","id":4}"#, BadFrame, Some(4), "unknown command type");
    // An event is not a command.
    json_err(br#"{"type":"connected","id":4}"#, BadFrame, Some(4), "unknown command type");
    json_err(br#"{"type":"pong"}"#, BadFrame, None, "unknown command type");
    // A bad id with a bad type: the type is reported (and no id).
    json_err(br#"{"type":"nope","id":"4"}"#, BadFrame, None, "unknown command type");
}

#[test]
fn deeply_nested_json_neither_overflows_nor_slips_through() {
    let deep = |field: &str| {
        format!(r#"{{"type":"open","id":1,"{field}":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000))
    };
    // In an unknown field it is skipped (serde_json skips without recursing).
    assert_eq!(json::decode_client(deep("x").as_bytes()).unwrap().id, Some(1));
    // In a known one it is the wrong type.
    json_err(deep("meta").as_bytes(), ErrorCode::BadCommand, Some(1), "field `meta`");
    json_err(deep("group").as_bytes(), ErrorCode::BadCommand, Some(1), "field `group`");
    // Unbalanced, it is not JSON.
    let broken = format!(r#"{{"type":"ping","x":{}}}"#, "[".repeat(100_000));
    json_err(broken.as_bytes(), ErrorCode::BadFrame, None, "not JSON");
}

#[test]
fn json_commands_with_bad_fields_are_bad_command_naming_the_field() {
    use ErrorCode::BadCommand;
    // The id itself.
    json_err(br#"{"type":"ping","id":"7"}"#, BadCommand, None, "field `id`");
    json_err(br#"{"type":"ping","id":1.5}"#, BadCommand, None, "field `id`");
    json_err(br#"{"type":"ping","id":9223372036854775808}"#, BadCommand, None, "field `id`");
    // Missing, null or mistyped required fields; the id survives.
    json_err(
        br#"{"type":"send","id":5,"conv":"c1","text":"hi"}"#,
        BadCommand,
        Some(5),
        "field `cid`: missing",
    );
    json_err(
        br#"{"type":"send","id":5,"cid":"x","text":"hi"}"#,
        BadCommand,
        Some(5),
        "field `conv`: missing",
    );
    json_err(
        br#"{"type":"send","id":5,"conv":null,"cid":"x","text":"hi"}"#,
        BadCommand,
        Some(5),
        "field `conv`",
    );
    json_err(
        br#"{"type":"send","id":5,"conv":42,"cid":"x","text":"hi"}"#,
        BadCommand,
        Some(5),
        "field `conv`",
    );
    json_err(
        br#"{"type":"send","id":5,"conv":"42","cid":"x","text":"hi"}"#,
        BadCommand,
        Some(5),
        "not a conversation id",
    );
    json_err(
        br#"{"type":"send","conv":"c1","cid":7,"text":"hi"}"#,
        BadCommand,
        None,
        "field `cid`: expected a string",
    );
    json_err(
        br#"{"type":"send","conv":"c1","cid":"","text":"hi"}"#,
        BadCommand,
        None,
        "field `cid`: must not be empty",
    );
    json_err(br#"{"type":"send","conv":"c1","cid":"x","text":5}"#, BadCommand, None, "field `text`");
    json_err(br#"{"type":"send","conv":"c1","cid":"x","text":"\ud800"}"#, BadCommand, None, "field `text`");
    json_err(
        br#"{"type":"send","conv":"c1","cid":"x"}"#,
        BadCommand,
        None,
        "needs a non-empty `text` or an `attachment`",
    );
    json_err(br#"{"type":"send","conv":"c1","cid":"x","text":""}"#, BadCommand, None, "field `text`");
    json_err(
        br#"{"type":"send","conv":"c1","cid":"x","attachment":"aGk="}"#,
        BadCommand,
        None,
        "field `attachment`: expected an object",
    );
    json_err(
        br#"{"type":"send","conv":"c1","cid":"x","attachment":{"data":"aGk="}}"#,
        BadCommand,
        None,
        "field `attachment.mime`: missing",
    );
    json_err(
        br#"{"type":"send","conv":"c1","cid":"x","attachment":{"mime":"","data":""}}"#,
        BadCommand,
        None,
        "field `attachment.mime`",
    );
    json_err(
        br#"{"type":"send","conv":"c1","cid":"x","attachment":{"mime":"a/b"}}"#,
        BadCommand,
        None,
        "field `attachment.data`: missing",
    );
    json_err(
        br#"{"type":"send","conv":"c1","cid":"x","attachment":{"mime":"a/b","data":"a"}}"#,
        BadCommand,
        None,
        "field `attachment.data`: not base64",
    );
    json_err(br#"{"type":"read","id":1,"conv":"c1"}"#, BadCommand, Some(1), "field `seq`: missing");
    json_err(
        br#"{"type":"read","conv":"c1","seq":-1}"#,
        BadCommand,
        None,
        "field `seq`: expected a non-negative integer",
    );
    json_err(br#"{"type":"read","conv":"c1","seq":1.0}"#, BadCommand, None, "field `seq`");
    json_err(br#"{"type":"read","conv":"c1","seq":"1"}"#, BadCommand, None, "field `seq`");
    json_err(br#"{"type":"typing"}"#, BadCommand, None, "field `conv`: missing");
    json_err(br#"{"type":"history","conv":"c1","limit":-1}"#, BadCommand, None, "field `limit`");
    json_err(br#"{"type":"history","conv":"c1","limit":4294967296}"#, BadCommand, None, "field `limit`");
    json_err(br#"{"type":"history","conv":"c1","before":"x"}"#, BadCommand, None, "field `before`");
    json_err(br#"{"type":"presence","id":2}"#, BadCommand, Some(2), "field `status`: missing");
    json_err(
        br#"{"type":"presence","status":"busy"}"#,
        BadCommand,
        None,
        "field `status`: expected \"online\"",
    );
    json_err(br#"{"type":"presence","status":"Online"}"#, BadCommand, None, "field `status`");
    json_err(br#"{"type":"presence","status":"away","capacity":-2}"#, BadCommand, None, "field `capacity`");
    json_err(br#"{"type":"accept","conv":"c"}"#, BadCommand, None, "field `conv`");
    json_err(br#"{"type":"close","conv":["c1"]}"#, BadCommand, None, "field `conv`");
    json_err(br#"{"type":"transfer","conv":"c1"}"#, BadCommand, None, "field `to`: missing");
    json_err(
        br#"{"type":"transfer","conv":"c1","to":""}"#,
        BadCommand,
        None,
        "field `to`: must not be empty",
    );
    json_err(
        br#"{"type":"transfer","conv":"c1","to":"group:"}"#,
        BadCommand,
        None,
        "field `to`: empty group name",
    );
    json_err(br#"{"type":"transfer","conv":"c1","to":{"agent":"a1"}}"#, BadCommand, None, "field `to`");
    json_err(br#"{"type":"connect","token":1}"#, BadCommand, None, "field `token`");
    json_err(br#"{"type":"connect","resume":[1]}"#, BadCommand, None, "field `resume`: expected an object");
    json_err(
        br#"{"type":"connect","resume":{"x1":3}}"#,
        BadCommand,
        None,
        "field `resume`: not a conversation id",
    );
    json_err(br#"{"type":"connect","resume":{"c1":"3"}}"#, BadCommand, None, "last seen seq of c1");
    json_err(br#"{"type":"connect","resume":{"c1":-3}}"#, BadCommand, None, "field `resume`");
    json_err(
        br#"{"type":"open","meta":{"plan":3}}"#,
        BadCommand,
        None,
        "field `meta`: value of \"plan\" must be a string",
    );
    json_err(br#"{"type":"open","meta":"plan"}"#, BadCommand, None, "field `meta`");
    json_err(br#"{"type":"open","group":5}"#, BadCommand, None, "field `group`");
}

#[test]
fn json_fields_over_their_bounds_are_too_large() {
    use ErrorCode::TooLarge;
    let send = |cid: &str| format!(r#"{{"type":"send","id":8,"conv":"c1","cid":"{cid}","text":"hi"}}"#);
    assert!(json::decode_client(send(&"x".repeat(CID_BYTES_MAX)).as_bytes()).is_ok());
    json_err(
        send(&"x".repeat(CID_BYTES_MAX + 1)).as_bytes(),
        TooLarge,
        Some(8),
        "field `cid`: longer than 64 bytes",
    );
    // Bytes, not characters.
    json_err(send(&"é".repeat(CID_BYTES_MAX / 2 + 1)).as_bytes(), TooLarge, Some(8), "field `cid`");

    let open = |n: usize, klen: usize, vlen: usize| {
        let entries: Vec<String> =
            (0..n).map(|i| format!(r#""{}{i:03}":"{}""#, "k".repeat(klen), "v".repeat(vlen))).collect();
        format!(r#"{{"type":"open","id":9,"meta":{{{}}}}}"#, entries.join(","))
    };
    assert!(json::decode_client(open(META_ENTRIES_MAX, 1, 1).as_bytes()).is_ok());
    json_err(open(META_ENTRIES_MAX + 1, 1, 1).as_bytes(), TooLarge, Some(9), "more than 64 entries");
    json_err(open(100_000, 1, 1).as_bytes(), TooLarge, Some(9), "more than 64 entries");
    assert!(json::decode_client(open(1, META_KEY_BYTES_MAX - 3, META_VALUE_BYTES_MAX).as_bytes()).is_ok());
    json_err(open(1, META_KEY_BYTES_MAX - 2, 1).as_bytes(), TooLarge, Some(9), "a key is longer");
    json_err(open(1, 1, META_VALUE_BYTES_MAX + 1).as_bytes(), TooLarge, Some(9), "is longer than 1024 bytes");

    let resume = |n: usize| {
        let entries: Vec<String> = (0..n).map(|i| format!(r#""c{i}":1"#)).collect();
        format!(r#"{{"type":"connect","resume":{{{}}}}}"#, entries.join(","))
    };
    assert!(json::decode_client(resume(RESUME_ENTRIES_MAX).as_bytes()).is_ok());
    json_err(resume(RESUME_ENTRIES_MAX + 1).as_bytes(), TooLarge, None, "field `resume`: more than 1024");

    let field = |name: &str, len: usize| format!(r#"{{"type":"connect","{name}":"{}"}}"#, "t".repeat(len));
    assert!(json::decode_client(field("token", TOKEN_BYTES_MAX).as_bytes()).is_ok());
    json_err(field("token", TOKEN_BYTES_MAX + 1).as_bytes(), TooLarge, None, "field `token`");
    json_err(field("visitor_id", ID_BYTES_MAX + 1).as_bytes(), TooLarge, None, "field `visitor_id`");
    json_err(field("visitor_key", ID_BYTES_MAX + 1).as_bytes(), TooLarge, None, "field `visitor_key`");
    let group = format!(r#"{{"type":"open","group":"{}"}}"#, "g".repeat(GROUP_BYTES_MAX + 1));
    json_err(group.as_bytes(), TooLarge, None, "field `group`");
    let to = format!(r#"{{"type":"transfer","conv":"c1","to":"group:{}"}}"#, "g".repeat(GROUP_BYTES_MAX + 1));
    json_err(to.as_bytes(), TooLarge, None, "field `to`");
    let to = format!(r#"{{"type":"transfer","conv":"c1","to":"{}"}}"#, "a".repeat(ID_BYTES_MAX + 1));
    json_err(to.as_bytes(), TooLarge, None, "field `to`");
    let mime = format!(
        r#"{{"type":"send","conv":"c1","cid":"x","attachment":{{"mime":"{}","data":""}}}}"#,
        "m".repeat(MIME_BYTES_MAX + 1)
    );
    json_err(mime.as_bytes(), TooLarge, None, "field `attachment.mime`");
}

#[test]
fn a_decode_error_becomes_the_error_reply_with_the_commands_id() {
    let err = json::decode_client(br#"{"type":"send","id":77,"conv":"c1"}"#).unwrap_err();
    let reply = err.reply();
    assert_eq!(reply.id, Some(77));
    assert!(
        matches!(reply.body, Event::Error { code: ErrorCode::BadCommand, ref message } if message.contains("cid"))
    );
    let mut out = Vec::new();
    json::encode_server(&reply, &mut out);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["id"].as_i64(), v["code"].as_str()),
        (Some("error"), Some(77), Some("bad_command"))
    );
    assert_eq!(err.to_string(), format!("bad_command: {}", err.message));
}

#[test]
fn json_server_frames_are_checked_too() {
    let err = |text: &str| json::decode_server(text.as_bytes()).unwrap_err();
    assert_eq!(err(r#"{"type":"ping"}"#).code, ErrorCode::BadFrame);
    let e = err(r#"{"type":"ack","id":3,"cid":"x","conv":"c1","seq":1}"#);
    assert_eq!((e.code, e.id), (ErrorCode::BadCommand, Some(3)));
    assert!(e.message.contains("field `ts`: missing"), "{e}");
    let e = err(r#"{"type":"history","conv":"c1","messages":[{"type":"ack"}]}"#);
    assert!(e.message.contains("messages[0].type"), "{e}");
    let e = err(
        r#"{"type":"history","conv":"c1","messages":[{"conv":"c1","seq":1,"cid":"x","from":{"role":"robot","id":"a","name":"b"},"ts":1}]}"#,
    );
    assert!(e.message.contains("messages[0].from.role"), "{e}");
    let e = err(r#"{"type":"error","code":"oops","message":""}"#);
    assert!(e.message.contains("field `code`"), "{e}");
    let e = err(
        r#"{"type":"connected","session":"s","role":"agent","user":{"id":"a","name":"b"},"conversations":[],"heartbeat_s":1}"#,
    );
    assert!(e.message.contains("user.meta"), "{e}");
}

// ---- FlatBuffers errors and hostile input -----------------------------------------

fn fb_envelope(
    id: Option<i64>,
    build: impl FnOnce(
        &mut FlatBufferBuilder<'static>,
    ) -> (g::Body, Option<WIPOffset<flatbuffers::UnionWIPOffset>>),
) -> Vec<u8> {
    let mut b = FlatBufferBuilder::new();
    let (body_type, body) = build(&mut b);
    let env = g::Envelope::create(&mut b, &g::EnvelopeArgs { id, body_type, body });
    b.finish_minimal(env);
    b.finished_data().to_vec()
}

use crate::generated as g;
use flatbuffers::{FlatBufferBuilder, WIPOffset};

#[track_caller]
fn fb_err(bytes: &[u8], code: ErrorCode, id: Option<i64>, needle: &str) {
    let err = fb::decode_client(bytes).unwrap_err();
    assert_eq!(err.code, code, "{err}");
    assert_eq!(err.id, id, "{err}");
    assert!(err.message.contains(needle), "{err:?} should mention {needle:?}");
}

#[test]
fn flatbuffers_frames_that_are_not_commands_are_bad_frame() {
    use ErrorCode::BadFrame;
    fb_err(b"", BadFrame, None, "not a kefu.v1.fb Envelope");
    fb_err(b"\x01\x02\x03", BadFrame, None, "not a kefu.v1.fb Envelope");
    fb_err(br#"{"type":"ping"}"#, BadFrame, None, "not a kefu.v1.fb Envelope");
    fb_err(&fb_envelope(Some(3), |_| (g::Body::NONE, None)), BadFrame, Some(3), "without a body");
    // A body type with no table behind it does not verify; the id survives.
    fb_err(
        &fb_envelope(Some(3), |_| (g::Body::PingCmd, None)),
        BadFrame,
        Some(3),
        "not a kefu.v1.fb Envelope",
    );
    // An event where a command belongs.
    let pong = fb_envelope(Some(4), |b| {
        (g::Body::PongEvt, Some(g::PongEvt::create(b, &g::PongEvtArgs {}).as_union_value()))
    });
    fb_err(&pong, BadFrame, Some(4), "PongEvt is an event, not a command");
    // A union member from a newer schema.
    let newer = fb_envelope(Some(5), |b| {
        (g::Body(200), Some(g::PingCmd::create(b, &g::PingCmdArgs {}).as_union_value()))
    });
    fb_err(&newer, BadFrame, Some(5), "unknown command (body type 200)");
    // And the mirror image on the client side.
    let ping = fb_envelope(Some(6), |b| {
        (g::Body::PingCmd, Some(g::PingCmd::create(b, &g::PingCmdArgs {}).as_union_value()))
    });
    let err = fb::decode_server(&ping).unwrap_err();
    assert_eq!((err.code, err.id), (BadFrame, Some(6)));
    assert!(err.message.contains("PingCmd is a command, not an event"), "{err}");
}

#[test]
fn flatbuffers_commands_with_bad_fields_are_bad_command_naming_the_field() {
    use ErrorCode::{BadCommand, TooLarge};
    let send = |conv: Option<&str>, cid: Option<&str>, text: Option<&str>| {
        fb_envelope(Some(7), |b| {
            let conv = conv.map(|s| b.create_string(s));
            let cid = cid.map(|s| b.create_string(s));
            let text = text.map(|s| b.create_string(s));
            let t = g::SendCmd::create(b, &g::SendCmdArgs { conv, cid, text, attachment: None });
            (g::Body::SendCmd, Some(t.as_union_value()))
        })
    };
    assert!(fb::decode_client(&send(Some("c1"), Some("x"), Some("hi"))).is_ok());
    fb_err(&send(None, Some("x"), Some("hi")), BadCommand, Some(7), "field `conv`: missing");
    fb_err(
        &send(Some("1"), Some("x"), Some("hi")),
        BadCommand,
        Some(7),
        "field `conv`: not a conversation id",
    );
    fb_err(&send(Some("c1"), None, Some("hi")), BadCommand, Some(7), "field `cid`: missing");
    fb_err(&send(Some("c1"), Some(""), Some("hi")), BadCommand, Some(7), "field `cid`: must not be empty");
    fb_err(&send(Some("c1"), Some(&"x".repeat(65)), Some("hi")), TooLarge, Some(7), "field `cid`");
    fb_err(&send(Some("c1"), Some("x"), None), BadCommand, Some(7), "needs a non-empty `text`");

    let read = fb_envelope(None, |b| {
        let conv = Some(b.create_string("c1"));
        (g::Body::ReadCmd, Some(g::ReadCmd::create(b, &g::ReadCmdArgs { conv, seq: None }).as_union_value()))
    });
    fb_err(&read, BadCommand, None, "field `seq`: missing");

    let presence = |status: Option<g::PresenceStatus>| {
        fb_envelope(Some(1), |b| {
            let t = g::PresenceCmd::create(b, &g::PresenceCmdArgs { status, capacity: None });
            (g::Body::PresenceCmd, Some(t.as_union_value()))
        })
    };
    fb_err(&presence(None), BadCommand, Some(1), "field `status`: missing");
    fb_err(
        &presence(Some(g::PresenceStatus(9))),
        BadCommand,
        Some(1),
        "field `status`: unknown presence status 9",
    );

    let attachment = |mime: Option<&str>, data: Option<&[u8]>| {
        fb_envelope(None, |b| {
            let conv = Some(b.create_string("c1"));
            let cid = Some(b.create_string("x"));
            let mime = mime.map(|s| b.create_string(s));
            let data = data.map(|d| b.create_vector(d));
            let a = g::Attachment::create(b, &g::AttachmentArgs { mime, data });
            let t = g::SendCmd::create(b, &g::SendCmdArgs { conv, cid, text: None, attachment: Some(a) });
            (g::Body::SendCmd, Some(t.as_union_value()))
        })
    };
    assert!(fb::decode_client(&attachment(Some("a/b"), Some(b""))).is_ok());
    fb_err(&attachment(None, Some(b"x")), BadCommand, None, "field `attachment.mime`: missing");
    fb_err(&attachment(Some("a/b"), None), BadCommand, None, "field `attachment.data`: missing");

    let transfer = |to: &str| {
        fb_envelope(None, |b| {
            let conv = Some(b.create_string("c1"));
            let to = Some(b.create_string(to));
            (
                g::Body::TransferCmd,
                Some(g::TransferCmd::create(b, &g::TransferCmdArgs { conv, to }).as_union_value()),
            )
        })
    };
    fb_err(&transfer("group:"), BadCommand, None, "field `to`");

    let open = |n: usize| {
        fb_envelope(None, |b| {
            let entries: Vec<_> = (0..n)
                .map(|i| {
                    let key = Some(b.create_string(&format!("k{i}")));
                    let value = Some(b.create_string("v"));
                    g::Meta::create(b, &g::MetaArgs { key, value })
                })
                .collect();
            let meta = Some(b.create_vector(&entries));
            (
                g::Body::OpenCmd,
                Some(g::OpenCmd::create(b, &g::OpenCmdArgs { group: None, meta }).as_union_value()),
            )
        })
    };
    assert!(fb::decode_client(&open(META_ENTRIES_MAX)).is_ok());
    fb_err(&open(META_ENTRIES_MAX + 1), TooLarge, None, "field `meta`: more than 64 entries");

    let resume = |n: usize, seq: Option<u64>| {
        fb_envelope(None, |b| {
            let entries: Vec<_> = (0..n)
                .map(|i| {
                    let conv = Some(b.create_string(&format!("c{i}")));
                    g::ResumeEntry::create(b, &g::ResumeEntryArgs { conv, last_seen_seq: seq })
                })
                .collect();
            let resume = Some(b.create_vector(&entries));
            let args = g::ConnectCmdArgs { token: None, visitor_id: None, visitor_key: None, resume };
            (g::Body::ConnectCmd, Some(g::ConnectCmd::create(b, &args).as_union_value()))
        })
    };
    assert!(fb::decode_client(&resume(RESUME_ENTRIES_MAX, Some(1))).is_ok());
    fb_err(&resume(RESUME_ENTRIES_MAX + 1, Some(1)), TooLarge, None, "field `resume`: more than 1024");
    fb_err(&resume(1, None), BadCommand, None, "the entry of c0 has no `last_seen_seq`");
}

#[test]
fn a_corrupt_flatbuffer_is_bad_frame_but_keeps_its_id() {
    let frame = ClientFrame {
        id: Some(31337),
        body: Command::Send { conv: c(1), cid: "x".into(), text: Some("hello".into()), attachment: None },
    };
    let mut b = FlatBufferBuilder::new();
    let good = fb::encode_client(&frame, &mut b).to_vec();
    let at = good.windows(5).position(|w| w == b"hello").unwrap();

    // A string that runs past the end of the buffer.
    let mut bad = good.clone();
    bad[at - 4..at].copy_from_slice(&u32::MAX.to_le_bytes());
    fb_err(&bad, ErrorCode::BadFrame, Some(31337), "not a kefu.v1.fb Envelope");

    // A string that is not UTF-8.
    let mut bad = good.clone();
    bad[at] = 0xff;
    fb_err(&bad, ErrorCode::BadFrame, Some(31337), "not a kefu.v1.fb Envelope");

    // Cut short: the body is gone, the envelope's id (near the start) is not.
    fb_err(&good[..good.len() / 2], ErrorCode::BadFrame, Some(31337), "not a kefu.v1.fb Envelope");
    // Cut shorter than the root offset: nothing to recover.
    fb_err(&good[..3], ErrorCode::BadFrame, None, "not a kefu.v1.fb Envelope");
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Mutations of valid buffers: flipped bits, overwritten bytes, interesting
/// values planted at aligned offsets, truncation, extension, spliced runs.
fn mutate(rng: &mut Rng, good: &[u8]) -> Vec<u8> {
    let mut buf = good.to_vec();
    for _ in 0..1 + rng.below(4) {
        if buf.is_empty() {
            buf.push(rng.next() as u8);
        }
        let at = rng.below(buf.len());
        match rng.below(7) {
            0 => buf[at] ^= 1 << rng.below(8),
            1 => buf[at] = rng.next() as u8,
            2 => {
                let at = at & !3;
                let v: u32 =
                    [0, 1, 2, 4, 0x7fff_ffff, 0xffff_ffff, 0x8000_0000, buf.len() as u32][rng.below(8)];
                for (i, byte) in v.to_le_bytes().into_iter().enumerate() {
                    if let Some(slot) = buf.get_mut(at + i) {
                        *slot = byte;
                    }
                }
            }
            3 => buf.truncate(at),
            4 => buf.extend((0..1 + rng.below(16)).map(|_| rng.next() as u8)),
            5 => {
                let len = rng.below(buf.len() - at).min(8);
                let from = rng.below(buf.len().saturating_sub(len).max(1));
                let run: Vec<u8> = buf[from..from + len].to_vec();
                buf[at..at + len].copy_from_slice(&run);
            }
            _ => buf[at] = buf[at].wrapping_add(1),
        }
    }
    buf
}

#[test]
fn hostile_flatbuffers_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut enc = Encoder::new();
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for frame in commands() {
        seeds.push(Codec::FlatBuffers.encode_client(&frame, &mut enc).to_vec());
    }
    for frame in events() {
        seeds.push(Codec::FlatBuffers.encode_server(&frame, &mut enc).to_vec());
    }
    let (mut accepted, mut refused, mut ids_recovered) = (0u32, 0u32, 0u32);
    for round in 0..40_000 {
        let buf = if round % 10 == 0 {
            (0..rng.below(128)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        match fb::decode_client(&buf) {
            Ok(frame) => {
                accepted += 1;
                // Whatever decodes re-encodes and decodes to the same thing.
                let again = Codec::FlatBuffers.encode_client(&frame, &mut enc).to_vec();
                assert_eq!(fb::decode_client(&again).unwrap(), frame);
            }
            Err(e) => {
                refused += 1;
                ids_recovered += u32::from(e.id.is_some());
                assert!(matches!(e.code, ErrorCode::BadFrame | ErrorCode::BadCommand | ErrorCode::TooLarge));
            }
        }
        if let Ok(frame) = fb::decode_server(&buf) {
            let again = Codec::FlatBuffers.encode_server(&frame, &mut enc).to_vec();
            assert_eq!(fb::decode_server(&again).unwrap(), frame);
        }
    }
    // The loop exercised both outcomes, and the id recovery.
    assert!(accepted > 1000 && refused > 1000 && ids_recovered > 100, "{accepted} {refused} {ids_recovered}");
}

#[test]
fn hostile_json_never_panics() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut enc = Encoder::new();
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for frame in commands() {
        seeds.push(Codec::Json.encode_client(&frame, &mut enc).to_vec());
    }
    for frame in events() {
        seeds.push(Codec::Json.encode_server(&frame, &mut enc).to_vec());
    }
    for _ in 0..20_000 {
        let seed = &seeds[rng.below(seeds.len())];
        let buf = mutate(&mut rng, seed);
        if let Ok(frame) = json::decode_client(&buf) {
            let again = Codec::Json.encode_client(&frame, &mut enc).to_vec();
            assert_eq!(json::decode_client(&again).unwrap(), frame);
        }
        if let Ok(frame) = json::decode_server(&buf) {
            let again = Codec::Json.encode_server(&frame, &mut enc).to_vec();
            assert_eq!(json::decode_server(&again).unwrap(), frame);
        }
    }
}

// ---- Codec and allocation ----------------------------------------------------------

#[test]
fn codecs_are_picked_by_subprotocol() {
    assert_eq!(Codec::from_subprotocol("kefu.v1.json"), Some(Codec::Json));
    assert_eq!(Codec::from_subprotocol("kefu.v1.fb"), Some(Codec::FlatBuffers));
    assert_eq!(Codec::from_subprotocol("kefu.v1.JSON"), None);
    assert_eq!(Codec::from_subprotocol("kefu.v2.json"), None);
    for codec in Codec::ALL {
        assert_eq!(Codec::from_subprotocol(codec.subprotocol()), Some(codec));
    }
    assert!(Codec::FlatBuffers.is_binary() && !Codec::Json.is_binary());
    // Each codec refuses the other's bytes as bad_frame.
    let mut enc = Encoder::new();
    let frame = ClientFrame { id: Some(1), body: Command::Ping };
    let json = Codec::Json.encode_client(&frame, &mut enc).to_vec();
    let fb = Codec::FlatBuffers.encode_client(&frame, &mut enc).to_vec();
    assert_eq!(Codec::FlatBuffers.decode_client(&json).unwrap_err().code, ErrorCode::BadFrame);
    assert_eq!(Codec::Json.decode_client(&fb).unwrap_err().code, ErrorCode::BadFrame);
}

#[test]
fn transfer_targets_parse_and_print() {
    assert_eq!(TransferTarget::parse("a1"), Ok(TransferTarget::Agent("a1".into())));
    assert_eq!(TransferTarget::parse("group:vip"), Ok(TransferTarget::Group("vip".into())));
    assert_eq!(TransferTarget::parse("group:a:b"), Ok(TransferTarget::Group("a:b".into())));
    assert_eq!(TransferTarget::parse("Group:vip"), Ok(TransferTarget::Agent("Group:vip".into())));
    assert!(TransferTarget::parse("").is_err() && TransferTarget::parse("group:").is_err());
    for s in ["a1", "group:vip"] {
        assert_eq!(TransferTarget::parse(s).unwrap().to_string(), s);
    }
}

#[test]
fn commands_name_their_type_and_conversation() {
    for frame in commands() {
        let mut out = Vec::new();
        json::encode_client(&frame, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"].as_str(), Some(frame.body.name()));
        assert_eq!(frame.body.conv().map(|c| c.to_string()).as_deref(), v["conv"].as_str());
    }
}

/// Counts this thread's allocations, so parallel tests do not disturb it.
struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to `System`; the counter is a
// const-initialised thread-local `Cell` with no destructor, which neither
// allocates nor re-enters the allocator.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as ours, passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, passed through.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as ours, passed through.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn encoding_allocates_nothing_once_buffers_have_grown() {
    // The counter sees allocations at all.
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 10]))) >= 1);
    let mut enc = Encoder::new();
    let frames = events();
    for codec in Codec::ALL {
        // Warm up: buffers grow to the largest frame, the scratch vector too.
        for frame in &frames {
            codec.encode_server(frame, &mut enc);
        }
        for frame in &frames {
            let n = allocations_during(|| {
                let bytes = codec.encode_server(frame, &mut enc);
                assert!(!bytes.is_empty());
            });
            assert_eq!(n, 0, "{codec:?} {}", frame.body.name());
        }
    }
}

#[test]
fn decoding_a_send_with_spare_strings_allocates_nothing() {
    let send = ClientFrame {
        id: Some(3),
        body: Command::Send {
            conv: ConvId(7),
            cid: "c-0001".into(),
            text: Some("hello, is anyone there?".into()),
            attachment: None,
        },
    };
    for codec in Codec::ALL {
        let bytes = match codec {
            Codec::Json => {
                let mut out = Vec::new();
                encode_client_json(&send, &mut out);
                out
            }
            Codec::FlatBuffers => encode_client_fb(&send, &mut FlatBufferBuilder::new()).to_vec(),
        };
        let mut spare = SpareStrings::new();
        // Without spares the frame's strings are allocated.
        let first = codec.decode_client_reusing(&bytes, &mut spare).unwrap();
        assert_eq!(first, send);
        // Given back (as the gateway does once the message is delivered),
        // they carry the next frame.
        let Command::Send { cid, text, .. } = first.body else { unreachable!() };
        spare.give(cid);
        spare.give(text.unwrap());
        let mut decoded = None;
        let n = allocations_during(|| decoded = Some(codec.decode_client_reusing(&bytes, &mut spare)));
        assert_eq!(decoded.unwrap().unwrap(), send);
        assert_eq!(n, 0, "{codec:?}");
    }
}
