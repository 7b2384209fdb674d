//! Outbound frames made by a shard for connections on any shard, and the
//! pool that recycles their buffers.
//!
//! A shard's chat service encodes each event once per subprotocol as a
//! complete WebSocket frame and hands the same bytes to every recipient's
//! shard: a [`SharedFrame`], an `Arc` of a buffer. Once every edge has
//! written and dropped its copy, the `Arc` is unique again, and the [`FramePool`] that
//! made it fills it with the next frame instead of allocating. So in steady
//! state relaying a message allocates no frame buffer: the pool holds about
//! as many buffers as frames are in flight, up to [`POOL_BUFFERS_MAX`].
//!
//! Nothing here needs `unsafe`: `Arc::get_mut` is the proof that no edge
//! still reads a buffer (it synchronises with the edges' drops).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kefu_proto::ErrorCode;
use kefu_proto::client::{Codec, Encoder, Event, ServerFrame};

use kefu_proto::ws::{MAX_HEADER_BYTES, OpCode, encode_header};

/// A complete WebSocket frame (header and payload), shared by every
/// connection it is queued on.
pub type SharedFrame = Arc<Vec<u8>>;

/// Buffers a pool keeps at most; frames beyond them (many slow readers
/// holding frames at once) get buffers of their own.
pub const POOL_BUFFERS_MAX: usize = 1024;
/// Frames larger than this are never pooled, so a rare big attachment does
/// not pin its size in the pool.
pub const POOLED_FRAME_BYTES_MAX: usize = 4096;
/// A new pooled buffer's capacity, enough for a typical chat frame, so that
/// buffers rarely grow when reused for a larger one.
const POOL_BUFFER_BYTES_MIN: usize = 512;
/// Buffers looked at for a free one before a frame gets a new buffer.
const PROBES: usize = 8;

/// Buffers for [`SharedFrame`]s, reused once nobody else holds them.
#[derive(Debug, Default)]
pub struct FramePool {
    buffers: Vec<SharedFrame>,
    /// Where the next search starts: the buffer handed out longest ago.
    next: usize,
}

impl FramePool {
    /// An empty pool; it grows with the frames in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Buffers the pool holds.
    pub fn len(&self) -> usize {
        self.buffers.len()
    }

    /// Whether the pool holds no buffer yet.
    pub fn is_empty(&self) -> bool {
        self.buffers.is_empty()
    }

    /// A frame holding `parts`, one after another.
    pub fn frame(&mut self, parts: &[&[u8]]) -> SharedFrame {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > POOLED_FRAME_BYTES_MAX {
            let mut buf = Vec::with_capacity(len);
            extend(&mut buf, parts);
            return Arc::new(buf);
        }
        let n = self.buffers.len();
        for _ in 0..n.min(PROBES) {
            let i = self.next;
            self.next = (i + 1) % n;
            if let Some(buf) = Arc::get_mut(&mut self.buffers[i]) {
                buf.clear();
                extend(buf, parts);
                return self.buffers[i].clone();
            }
        }
        let mut buf = Vec::with_capacity(len.max(POOL_BUFFER_BYTES_MIN));
        extend(&mut buf, parts);
        let frame = Arc::new(buf);
        if n < POOL_BUFFERS_MAX {
            self.buffers.push(frame.clone());
        }
        frame
    }
}

fn extend(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    for p in parts {
        buf.extend_from_slice(p);
    }
}

/// `error` frames encoded, by code, for `/metrics`.
#[derive(Debug, Default)]
pub struct ErrorCounts([AtomicU64; ErrorCode::ALL.len()]);

impl ErrorCounts {
    /// Error frames with `code` encoded so far.
    pub fn get(&self, code: ErrorCode) -> u64 {
        self.0[code as usize].load(Ordering::Relaxed)
    }
}

thread_local! {
    /// Where this thread's encoders count errors. Per thread rather than
    /// per encoder because every machine of a shard has its own encoder,
    /// deep inside, and they all count for the shard.
    static ERRORS: RefCell<Option<Arc<ErrorCounts>>> = const { RefCell::new(None) };
}

/// Makes every [`FrameEncoder`] on this thread count the `error` frames it
/// encodes into `counts` (a shard's, set once at its start).
pub fn count_errors_into(counts: Arc<ErrorCounts>) {
    ERRORS.with(|e| *e.borrow_mut() = Some(counts));
}

/// Encodes server frames into pooled [`SharedFrame`]s.
#[derive(Debug, Default)]
pub struct FrameEncoder {
    encoder: Encoder,
    pool: FramePool,
}

impl FrameEncoder {
    /// An encoder with an empty pool.
    pub fn new() -> Self {
        Self { encoder: Encoder::new(), pool: FramePool::new() }
    }

    /// `frame` for `codec`, as one complete server WebSocket frame.
    pub fn encode(&mut self, codec: Codec, frame: &ServerFrame) -> SharedFrame {
        if let Event::Error { code, .. } = &frame.body {
            ERRORS.with(|e| {
                if let Some(counts) = &*e.borrow() {
                    counts.0[*code as usize].fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let payload = codec.encode_server(frame, &mut self.encoder);
        let opcode = if codec.is_binary() { OpCode::Binary } else { OpCode::Text };
        let mut header = [0u8; MAX_HEADER_BYTES];
        let h = encode_header(&mut header, true, opcode, payload.len() as u64, None);
        self.pool.frame(&[&header[..h], payload])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_reused_only_once_every_holder_dropped_it() {
        let mut pool = FramePool::new();
        let a = pool.frame(&[b"ab", b"c"]);
        assert_eq!(a.as_slice(), b"abc");
        let held = a.clone();
        drop(a);
        // Still held (an edge has not written it yet): a new buffer.
        let b = pool.frame(&[b"xyz"]);
        assert!(!Arc::ptr_eq(&held, &b));
        assert_eq!(held.as_slice(), b"abc", "a held frame is never overwritten");
        assert_eq!(pool.len(), 2);
        let held_ptr = Arc::as_ptr(&held);
        drop(held);
        drop(b);
        let c = pool.frame(&[b"hello"]);
        assert_eq!(c.as_slice(), b"hello");
        assert!(std::ptr::eq(Arc::as_ptr(&c), held_ptr), "the oldest free buffer is reused");
        assert_eq!(pool.len(), 2);
    }

    #[test]
    fn the_pool_is_bounded_and_big_frames_are_not_kept() {
        let mut pool = FramePool::new();
        let big = vec![7u8; POOLED_FRAME_BYTES_MAX + 1];
        let f = pool.frame(&[&big]);
        assert_eq!(f.len(), big.len());
        assert!(pool.is_empty());
        let held: Vec<_> = (0..POOL_BUFFERS_MAX + 10).map(|_| pool.frame(&[b"x"])).collect();
        assert_eq!(pool.len(), POOL_BUFFERS_MAX);
        assert!(held.iter().all(|f| f.as_slice() == b"x"));
    }

    #[test]
    fn encoded_frames_carry_a_websocket_header() {
        let mut enc = FrameEncoder::new();
        let frame = ServerFrame::reply(Some(1), kefu_proto::client::Event::Pong);
        let bytes = enc.encode(Codec::Json, &frame);
        assert_eq!(bytes[0], 0x81, "FIN + text");
        assert_eq!(usize::from(bytes[1]), bytes.len() - 2);
    }

    #[test]
    fn error_frames_are_counted_by_code_on_a_thread_that_asked() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "ErrorCounts indexes by declaration order");
        }
        let counts = Arc::new(ErrorCounts::default());
        let mut enc = FrameEncoder::new();
        let error = ServerFrame::error(Some(1), ErrorCode::BadCommand, "no");
        enc.encode(Codec::Json, &error);
        assert_eq!(counts.get(ErrorCode::BadCommand), 0, "not counted before");
        count_errors_into(counts.clone());
        enc.encode(Codec::Json, &error);
        enc.encode(Codec::FlatBuffers, &error);
        enc.encode(Codec::Json, &ServerFrame::reply(Some(2), Event::Pong));
        assert_eq!(counts.get(ErrorCode::BadCommand), 2);
        assert_eq!(counts.get(ErrorCode::Internal), 0);
    }
}
