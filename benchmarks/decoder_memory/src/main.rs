//! What a streaming decoder holds per stream: zstd's (read with `ZSTD_sizeof_DCtx`,
//! since it allocates through zstd's own `malloc`) for frames asking for windows of
//! 2^21 to 2^27, with zstd's default window limit and with the crate's (2^23); and
//! brotli's (counted by a counting global allocator) for windows of 2^22 and 2^24. Each
//! stream is 40 MiB of text written in 64 KiB pieces (so the frame does not know its
//! size and keeps its window), and each decoder is read after 64 pieces of 8 KiB.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use zstd::zstd_safe::{CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// Bytes the Rust allocator has handed out and not taken back.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator unchanged, counting sizes on the way.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Discards what it is given.
struct Sink;

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// 40 MiB of lowercase letters and spaces from a xorshift generator.
fn text() -> Vec<u8> {
    let mut x: u64 = 1;
    (0..40u32 << 20)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 { (x % 26) as u8 + b'a' } else { b' ' }
        })
        .collect()
}

fn zstd_stream(plain: &[u8], window_log: u32) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    encoder
        .set_parameter(CParameter::WindowLog(window_log))
        .unwrap();
    for piece in plain.chunks(1 << 16) {
        encoder.write_all(piece).unwrap();
    }
    encoder.finish().unwrap()
}

/// The zstd decoder's size after 64 pieces of `stream`, and its error if it refused.
fn zstd_decoder_size(stream: &[u8], window_log_max: Option<u32>) -> (usize, Option<String>) {
    let mut dctx = DCtx::create();
    if let Some(max) = window_log_max {
        dctx.set_parameter(DParameter::WindowLogMax(max)).unwrap();
    }
    let mut output = vec![0u8; 1 << 17];
    for piece in stream.chunks(8192).take(64) {
        let mut input = InBuffer::around(piece);
        while input.pos() < piece.len() {
            let mut out = OutBuffer::around(&mut output[..]);
            if let Err(code) = dctx.decompress_stream(&mut out, &mut input) {
                return (dctx.sizeof(), Some(zstd::zstd_safe::get_error_name(code).into()));
            }
        }
    }
    (dctx.sizeof(), None)
}

fn main() {
    let plain = text();
    println!("zstd: window log, limit, decoder size");
    for window_log in [21u32, 23, 24, 27] {
        let stream = zstd_stream(&plain, window_log);
        for limit in [None, Some(23)] {
            let (size, refused) = zstd_decoder_size(&stream, limit);
            let limit = limit.map_or("default (27)".to_string(), |l| l.to_string());
            let refused = refused.map_or(String::new(), |e| format!(" (refused: {e})"));
            println!("  {window_log}  {limit}  {:.1} MiB{refused}", size as f64 / MIB);
        }
    }
    println!("brotli: window log, decoder size");
    for window_log in [22u32, 24] {
        let mut stream = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut stream, 4096, 5, window_log);
            for piece in plain.chunks(1 << 16) {
                w.write_all(piece).unwrap();
            }
        }
        let before = LIVE.load(Relaxed);
        let mut decoder = brotli_decompressor::DecompressorWriter::new(Sink, 4096);
        for piece in stream.chunks(8192).take(64) {
            decoder.write_all(piece).unwrap();
            decoder.flush().unwrap();
        }
        let held = LIVE.load(Relaxed) - before;
        println!("  {window_log}  {:.1} MiB", held as f64 / MIB);
        drop(decoder);
    }
}
