//! The chat shard's side of the chat service (see the module above).

use std::sync::Arc;

use kefu_proto::ErrorCode;
use kefu_proto::client::{Codec, Encoder, ServerFrame};

use super::{SessionAddr, ShardMsg};
use crate::mailbox::Mailbox;
use crate::ws::frame::{MAX_HEADER_BYTES, OpCode, encode_header};

/// Encodes `frame` for `codec` as one complete server WebSocket frame.
pub fn ws_frame(codec: Codec, frame: &ServerFrame, encoder: &mut Encoder) -> Arc<[u8]> {
    let payload = codec.encode_server(frame, encoder);
    let opcode = if codec.is_binary() { OpCode::Binary } else { OpCode::Text };
    let mut header = [0u8; MAX_HEADER_BYTES];
    let h = encode_header(&mut header, true, opcode, payload.len() as u64, None);
    let mut bytes = Vec::with_capacity(h + payload.len());
    bytes.extend_from_slice(&header[..h]);
    bytes.extend_from_slice(payload);
    bytes.into()
}

/// The chat service on the chat shard.
pub struct ChatService {
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    encoder: Encoder,
}

impl ChatService {
    /// A service that reaches every shard through `mailboxes`.
    pub fn new(mailboxes: Arc<[Mailbox<ShardMsg>]>) -> Self {
        Self { mailboxes, encoder: Encoder::new() }
    }

    /// Handles one message addressed to the chat service.
    pub fn handle(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Frame { from, codec, frame } => {
                let reply = ServerFrame::error(
                    frame.id,
                    ErrorCode::Unavailable,
                    format!("command {:?} is not served by this build yet", frame.body.name()),
                );
                self.send(from, codec, &reply);
            }
            ShardMsg::Gone { .. } => {}
            ShardMsg::Deliver { .. } | ShardMsg::Close { .. } => {
                debug_assert!(false, "edge message routed to the chat service");
            }
        }
    }

    fn send(&mut self, to: SessionAddr, codec: Codec, frame: &ServerFrame) {
        let bytes = ws_frame(codec, frame, &mut self.encoder);
        // A full edge inbox drops the frame for that one connection; the
        // edge's own outbound bound would cut it anyway (slow consumer).
        let _ = self.mailboxes[to.shard as usize].send(ShardMsg::Deliver { to, bytes });
    }
}
