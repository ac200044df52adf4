//! Decoded views of compressed bodies. A response body is decoded for metering only:
//! the client receives the upstream's bytes unchanged, while the usage reader sees them
//! decoded, frame by frame, in bounded memory (each frame's output is read and dropped).
//! A request body is decoded whole, up to the size the layer reads, to find its model
//! and estimate. Nothing escapes metering, or a model's limits, by compressing.

use std::io::Write;

/// How a body is encoded (`Content-Encoding`).
pub(crate) enum Encoding {
    Identity,
    Known(Box<Decoder>),
    /// An encoding this crate cannot read: the body's usage is unreadable.
    Unknown(String),
}

/// A streaming decoder writing decoded bytes into a buffer the caller drains.
pub(crate) enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    /// `deflate`: zlib-wrapped per the HTTP spec, or raw deflate as some servers send;
    /// chosen from the first byte.
    Deflate(Option<DeflateKind>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Vec<u8>>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Vec<u8>>>),
}

pub(crate) enum DeflateKind {
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
}

/// Brotli's internal buffer (its window is allocated as the stream demands).
const BROTLI_BUFFER: usize = 4096;

impl Encoding {
    /// The encoding named by a `Content-Encoding` value (one coding; a list of several
    /// is treated as unknown).
    pub(crate) fn from_header(value: Option<&http::HeaderValue>) -> Self {
        let Some(value) = value else {
            return Encoding::Identity;
        };
        let name = value.to_str().unwrap_or("?").trim().to_ascii_lowercase();
        let decoder = match name.as_str() {
            "" | "identity" => return Encoding::Identity,
            "gzip" | "x-gzip" => Decoder::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
            "deflate" => Decoder::Deflate(None),
            "br" => Decoder::Brotli(Box::new(brotli_decompressor::DecompressorWriter::new(
                Vec::new(),
                BROTLI_BUFFER,
            ))),
            "zstd" => match zstd::stream::write::Decoder::new(Vec::new()) {
                Ok(d) => Decoder::Zstd(Box::new(d)),
                Err(_) => return Encoding::Unknown(name),
            },
            _ => return Encoding::Unknown(name),
        };
        Encoding::Known(Box::new(decoder))
    }
}

impl Decoder {
    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Deflate(Some(DeflateKind::Zlib(d))) => d.get_mut(),
            Decoder::Deflate(Some(DeflateKind::Raw(d))) => d.get_mut(),
            Decoder::Deflate(None) => unreachable!("deflate kind chosen before output"),
            Decoder::Brotli(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
        }
    }

    /// Decode `input`; `out` receives what it decoded to (the caller reads and clears
    /// it).
    pub(crate) fn write(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        if input.is_empty() {
            return Ok(());
        }
        if let Decoder::Deflate(kind @ None) = self {
            // zlib streams start with a CMF byte of 0x?8 whose header checksums.
            let zlib = input[0] & 0x0f == 8 && input[0] >> 4 <= 7;
            *kind = Some(if zlib {
                DeflateKind::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
            } else {
                DeflateKind::Raw(flate2::write::DeflateDecoder::new(Vec::new()))
            });
        }
        // Flushed after each write: the decoded bytes are read (and dropped) now, not
        // held in the decoder's own buffer, and a body cut right after is still counted.
        let result = match self {
            Decoder::Gzip(d) => d.write_all(input).and_then(|()| d.flush()),
            Decoder::Deflate(Some(DeflateKind::Zlib(d))) => {
                d.write_all(input).and_then(|()| d.flush())
            }
            Decoder::Deflate(Some(DeflateKind::Raw(d))) => {
                d.write_all(input).and_then(|()| d.flush())
            }
            Decoder::Deflate(None) => Ok(()),
            Decoder::Brotli(d) => d.write_all(input).and_then(|()| d.flush()),
            Decoder::Zstd(d) => d.write_all(input).and_then(|()| d.flush()),
        };
        // Take what was decoded even if the input then failed.
        let decoded = self.output();
        out.append(decoded);
        result
    }

    /// The body ended: flush what the decoder still holds into `out`.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let result = match self {
            Decoder::Gzip(d) => d.try_finish(),
            Decoder::Deflate(Some(DeflateKind::Zlib(d))) => d.try_finish(),
            Decoder::Deflate(Some(DeflateKind::Raw(d))) => d.try_finish(),
            Decoder::Deflate(None) => Ok(()),
            Decoder::Brotli(d) => d.flush(),
            Decoder::Zstd(d) => d.flush(),
        };
        if !matches!(self, Decoder::Deflate(None)) {
            out.append(self.output());
        }
        result
    }
}

/// Why a compressed request body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unreadable {
    /// It decodes to more than the layer reads.
    TooLarge,
    /// It does not decode under its encoding.
    Corrupt,
    /// Its encoding is one this crate cannot read (the name).
    Unsupported(String),
}

/// Input fed to a decoder at a time, so that a body that decodes to far more than it
/// weighs (a "zip bomb") is stopped soon after passing `max`: deflate expands a byte to
/// at most ~1 032, so a step overshoots by at most ~1 MiB.
const REQUEST_STEP: usize = 1024;

/// The whole of a request `body` under `encoding`, decoded, if that is at most `max`
/// bytes. `None` for an identity body (the bytes as they are).
pub(crate) fn decode_request(
    encoding: Encoding,
    body: &[u8],
    max: usize,
) -> Result<Option<Vec<u8>>, Unreadable> {
    let mut decoder = match encoding {
        Encoding::Identity => return Ok(None),
        Encoding::Unknown(name) => return Err(Unreadable::Unsupported(name)),
        Encoding::Known(decoder) => decoder,
    };
    let mut decoded = Vec::new();
    for step in body.chunks(REQUEST_STEP) {
        decoder
            .write(step, &mut decoded)
            .map_err(|_| Unreadable::Corrupt)?;
        if decoded.len() > max {
            return Err(Unreadable::TooLarge);
        }
    }
    decoder
        .finish(&mut decoded)
        .map_err(|_| Unreadable::Corrupt)?;
    if decoded.len() > max {
        return Err(Unreadable::TooLarge);
    }
    Ok(Some(decoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(encoding: &str, compressed: &[u8], plain: &[u8]) {
        let value = http::HeaderValue::from_str(encoding).unwrap();
        for split in [1, 7, 100, compressed.len().max(1)] {
            let Encoding::Known(mut decoder) = Encoding::from_header(Some(&value)) else {
                panic!("{encoding} is known");
            };
            let mut out = Vec::new();
            let mut all = Vec::new();
            for chunk in compressed.chunks(split) {
                decoder.write(chunk, &mut out).unwrap();
                all.append(&mut out);
            }
            decoder.finish(&mut out).unwrap();
            all.append(&mut out);
            assert_eq!(all, plain, "{encoding} split {split}");
        }
    }

    #[test]
    fn request_bodies_decode_whole_within_the_bound() {
        let header =
            |v: &'static str| Encoding::from_header(Some(&http::HeaderValue::from_static(v)));
        let plain = br#"{"model":"gpt-4o","messages":[]}"#.repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(
            decode_request(header("gzip"), &gz, plain.len())
                .unwrap()
                .unwrap(),
            plain
        );
        assert_eq!(
            decode_request(header("gzip"), &gz, plain.len() - 1),
            Err(Unreadable::TooLarge)
        );
        assert_eq!(
            decode_request(header("gzip"), &gz[..gz.len() / 2], usize::MAX),
            Err(Unreadable::Corrupt)
        );
        assert_eq!(
            decode_request(header("gzip"), b"not gzip", usize::MAX),
            Err(Unreadable::Corrupt)
        );
        assert_eq!(decode_request(header("identity"), &plain, 1), Ok(None));
        assert_eq!(
            decode_request(header("compress"), &plain, usize::MAX),
            Err(Unreadable::Unsupported("compress".into()))
        );
        // 64 MiB of zeros in ~64 KiB: stopped soon after the bound, not decoded whole.
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        for _ in 0..64 {
            bomb.write_all(&vec![0u8; 1 << 20]).unwrap();
        }
        let bomb = bomb.finish().unwrap();
        assert_eq!(
            decode_request(header("gzip"), &bomb, 4 << 20),
            Err(Unreadable::TooLarge)
        );
    }

    #[test]
    fn every_encoding_decodes_at_any_split() {
        let plain = b"data: {\"usage\":{\"prompt_tokens\":1}}\n\n".repeat(50);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap();
        roundtrip("gzip", &gz.finish().unwrap(), &plain);
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(&plain).unwrap();
        roundtrip("deflate", &zl.finish().unwrap(), &plain);
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&plain).unwrap();
        roundtrip("deflate", &raw.finish().unwrap(), &plain);
        roundtrip("zstd", &zstd::encode_all(&plain[..], 3).unwrap(), &plain);
        assert!(matches!(
            Encoding::from_header(Some(&http::HeaderValue::from_static("compress"))),
            Encoding::Unknown(_)
        ));
    }
}
