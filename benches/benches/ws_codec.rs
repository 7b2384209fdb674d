//! The WebSocket hot path in isolation: decoding (header parse, unmask,
//! UTF-8 check), encoding, and unmasking, in MB/s of payload.
//!
//! Run: `cargo bench -p kefu-benches --bench ws_codec`. The naive byte-loop
//! unmask is here as the yardstick the word-at-a-time version must beat.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kefu_gateway::ws::decoder::{Decoded, Decoder, Limits, Role};
use kefu_gateway::ws::frame::{MAX_HEADER_BYTES, OpCode, apply_mask, encode_header};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const SIZES: [usize; 3] = [512, 16 * 1024, 1 << 20];

/// `count` masked client frames of `size` bytes each, back to back.
fn masked_frames(opcode: OpCode, size: usize, count: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut out = Vec::with_capacity(count * (size + MAX_HEADER_BYTES));
    for _ in 0..count {
        let mut header = [0u8; MAX_HEADER_BYTES];
        let h = encode_header(&mut header, true, opcode, size as u64, Some(MASK));
        out.extend_from_slice(&header[..h]);
        let start = out.len();
        out.extend_from_slice(&payload);
        apply_mask(&mut out[start..], MASK, 0);
    }
    out
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, opcode) in [("text", OpCode::Text), ("binary", OpCode::Binary)] {
        for size in SIZES {
            let count = (4 << 20) / size;
            let wire = masked_frames(opcode, size, count.max(1));
            group.throughput(Throughput::Bytes((size * count.max(1)) as u64));
            group.bench_with_input(BenchmarkId::new(name, size), &wire, |b, wire| {
                let limits = Limits { max_frame_bytes: 16 << 20, max_message_bytes: 16 << 20 };
                let mut buf = wire.clone();
                b.iter(|| {
                    // Re-mask costs a copy, not counted separately: decode
                    // unmasks in place, so every pass needs fresh input.
                    buf.copy_from_slice(wire);
                    let mut decoder = Decoder::new(Role::Server, limits);
                    let mut pos = 0;
                    let mut messages = 0;
                    while pos < buf.len() {
                        let (used, r) = decoder.decode(&mut buf[pos..]);
                        pos += used;
                        match r {
                            Ok(Decoded::Data { message_end: true, .. }) => messages += 1,
                            Ok(Decoded::NeedMore) => break,
                            Ok(_) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    black_box(messages)
                });
            });
        }
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in SIZES {
        let payload = vec![7u8; size];
        let mut out = vec![0u8; size + MAX_HEADER_BYTES];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("server_frame", size), |b| {
            b.iter(|| {
                let mut header = [0u8; MAX_HEADER_BYTES];
                let h = encode_header(&mut header, true, OpCode::Binary, size as u64, None);
                out[..h].copy_from_slice(&header[..h]);
                out[h..h + size].copy_from_slice(black_box(&payload));
                black_box(&out);
            });
        });
    }
    group.finish();
}

fn unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    for size in SIZES {
        let mut buf = vec![0x55u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("kefu", size), |b| {
            b.iter(|| apply_mask(black_box(&mut buf), MASK, 1));
        });
        group.bench_function(BenchmarkId::new("naive_bytewise", size), |b| {
            b.iter(|| {
                for (i, byte) in black_box(&mut buf).iter_mut().enumerate() {
                    *byte ^= MASK[(i + 1) % 4];
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode, unmask);
criterion_main!(benches);
