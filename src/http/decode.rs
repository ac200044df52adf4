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
    Gzip(flate2::write::MultiGzDecoder<Bounded>),
    /// `deflate`: zlib-wrapped per the HTTP spec, or raw deflate as some servers send;
    /// chosen from the first byte.
    Deflate(Option<DeflateKind>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Bounded>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Bounded>>),
}

pub(crate) enum DeflateKind {
    Zlib(flate2::write::ZlibDecoder<Bounded>),
    Raw(flate2::write::DeflateDecoder<Bounded>),
}

/// The most one write into a decoder may decode to before it is read: a piece of
/// input that decodes to more (a "bomb": brotli turns a few hundred bytes into
/// gigabytes) fails instead of being held whole in memory. As large as the most a
/// response body is read decoded at all (64 MiB), so that a highly compressible but
/// honest body (thousands of identical events) is still metered exactly.
const MAX_PIECE_OUTPUT: usize = 64 << 20;

/// Where a decoder writes: a buffer that refuses to grow beyond [`MAX_PIECE_OUTPUT`]
/// (its reader drains it after every write).
#[derive(Default)]
pub(crate) struct Bounded(Vec<u8>);

impl Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + data.len() > MAX_PIECE_OUTPUT {
            return Err(std::io::Error::other(
                "a piece of the body decodes to more than the rate limiter reads at once",
            ));
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Brotli's internal buffer (its window is allocated as the stream demands).
const BROTLI_BUFFER: usize = 4096;

/// The largest zstd window a body may use, as a power of two: 8 MiB, the most the zstd
/// content coding of HTTP allows (RFC 9659) and what browsers decode. The decoder holds
/// its frame's window for the whole stream, and without this bound it takes up to
/// 128 MiB (window log 27) for any stream that asks, a request body a client sends
/// among them. A larger window fails to decode: a response is then charged its
/// estimate, a request refused as corrupt.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// A coding this crate decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    /// The coding the `Content-Encoding` header lines of `headers` name, read as one
    /// list (several lines mean the same as one line listing their values; `identity`
    /// is no coding): `None` for none, or the name of what this crate does not decode
    /// (an unknown coding, or several stacked).
    fn of(headers: &http::HeaderMap) -> Result<Option<Self>, String> {
        let mut codings = Vec::new();
        for value in headers.get_all(http::header::CONTENT_ENCODING) {
            let Ok(value) = value.to_str() else {
                return Err("?".into());
            };
            for coding in value.split(',') {
                let coding = coding.trim().to_ascii_lowercase();
                if !coding.is_empty() && coding != "identity" {
                    codings.push(coding);
                }
            }
        }
        match codings.as_slice() {
            [] => Ok(None),
            [one] => match one.as_str() {
                "gzip" | "x-gzip" => Ok(Some(Coding::Gzip)),
                "deflate" => Ok(Some(Coding::Deflate)),
                "br" => Ok(Some(Coding::Brotli)),
                "zstd" => Ok(Some(Coding::Zstd)),
                _ => Err(one.clone()),
            },
            several => Err(several.join(", ")),
        }
    }
}

impl Encoding {
    /// How a body whose headers are `headers` is encoded (see [`Coding::of`]), with a
    /// streaming decoder for a coding this crate reads.
    pub(crate) fn of(headers: &http::HeaderMap) -> Self {
        let decoder = match Coding::of(headers) {
            Ok(None) => return Encoding::Identity,
            Err(name) => return Encoding::Unknown(name),
            Ok(Some(Coding::Gzip)) => {
                Decoder::Gzip(flate2::write::MultiGzDecoder::new(Bounded::default()))
            }
            Ok(Some(Coding::Deflate)) => Decoder::Deflate(None),
            Ok(Some(Coding::Brotli)) => Decoder::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(Bounded::default(), BROTLI_BUFFER),
            )),
            Ok(Some(Coding::Zstd)) => {
                match zstd::stream::write::Decoder::new(Bounded::default())
                    .and_then(|mut d| d.window_log_max(ZSTD_WINDOW_LOG_MAX).map(|()| d))
                {
                    Ok(d) => Decoder::Zstd(Box::new(d)),
                    Err(_) => return Encoding::Unknown("zstd".into()),
                }
            }
        };
        Encoding::Known(Box::new(decoder))
    }
}

impl Decoder {
    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Decoder::Gzip(d) => &mut d.get_mut().0,
            Decoder::Deflate(Some(DeflateKind::Zlib(d))) => &mut d.get_mut().0,
            Decoder::Deflate(Some(DeflateKind::Raw(d))) => &mut d.get_mut().0,
            Decoder::Deflate(None) => unreachable!("deflate kind chosen before output"),
            Decoder::Brotli(d) => &mut d.get_mut().0,
            Decoder::Zstd(d) => &mut d.get_mut().0,
        }
    }

    /// Decode `input`; `out` receives what it decoded to (the caller reads and clears
    /// it).
    pub(crate) fn write(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        if input.is_empty() {
            return Ok(());
        }
        if let Decoder::Deflate(kind @ None) = self {
            *kind = Some(if is_zlib(input[0]) {
                DeflateKind::Zlib(flate2::write::ZlibDecoder::new(Bounded::default()))
            } else {
                DeflateKind::Raw(flate2::write::DeflateDecoder::new(Bounded::default()))
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

    /// The body ended: flush what the decoder still holds into `out`; an error if the
    /// stream was cut short.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let result = match self {
            Decoder::Gzip(d) => d.try_finish(),
            Decoder::Deflate(Some(DeflateKind::Zlib(d))) => d.try_finish(),
            Decoder::Deflate(Some(DeflateKind::Raw(d))) => d.try_finish(),
            Decoder::Deflate(None) => Ok(()),
            // (Both fail on a stream that ends before its end: as gzip's and zlib's
            // `try_finish` do, and as a flush does not.)
            Decoder::Brotli(d) => d.close(),
            Decoder::Zstd(d) => d.do_finish(),
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

/// The whole of a request `body`, encoded as `headers` say, decoded, if that is at most
/// `max` bytes. `None` for an identity body (the bytes as they are).
///
/// Decoded by pulling: a decoder produces output only as it is read, so reading at
/// most `max + 1` bytes bounds the memory and time a body that decodes to far more
/// than it weighs can take (brotli turns a few hundred bytes into gigabytes). A stream
/// that ends early (truncated, or empty) does not decode: every decoder here fails when
/// its input ends before its stream does.
pub(crate) fn decode_request(
    headers: &http::HeaderMap,
    body: &[u8],
    max: usize,
) -> Result<Option<Vec<u8>>, Unreadable> {
    use std::io::Read;
    let coding = match Coding::of(headers) {
        Ok(None) => return Ok(None),
        Ok(Some(coding)) => coding,
        Err(name) => return Err(Unreadable::Unsupported(name)),
    };
    if body.is_empty() {
        return Err(Unreadable::Corrupt);
    }
    let reader: Box<dyn Read + '_> = match coding {
        Coding::Gzip => Box::new(GzipMembers {
            current: flate2::bufread::GzDecoder::new(body),
            members: 1,
        }),
        Coding::Deflate if is_zlib(body[0]) => Box::new(flate2::read::ZlibDecoder::new(body)),
        Coding::Deflate => Box::new(flate2::read::DeflateDecoder::new(body)),
        Coding::Brotli => Box::new(brotli_decompressor::Decompressor::new(body, BROTLI_BUFFER)),
        Coding::Zstd => Box::new(
            zstd::stream::read::Decoder::new(body)
                .and_then(|mut d| d.window_log_max(ZSTD_WINDOW_LOG_MAX).map(|()| d))
                .map_err(|_| Unreadable::Corrupt)?,
        ),
    };
    let mut decoded = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(limit)
        .read_to_end(&mut decoded)
        .map_err(|_| Unreadable::Corrupt)?;
    if decoded.len() > max {
        return Err(Unreadable::TooLarge);
    }
    Ok(Some(decoded))
}

/// The most members a gzip request body may have. RFC 1952 lets a gzip stream hold
/// several, one after another, and clients send one; each costs a decoder's setup (tens
/// of µs), so a body of a few MiB of empty members would hold a runtime worker for
/// seconds before its size is known.
const MAX_GZIP_MEMBERS: usize = 64;

/// A gzip body decoded member after member, at most [`MAX_GZIP_MEMBERS`] of them (more
/// fail to read, as a corrupt body does).
struct GzipMembers<'a> {
    current: flate2::bufread::GzDecoder<&'a [u8]>,
    members: usize,
}

impl<'a> std::io::Read for GzipMembers<'a> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // This member has ended: what follows it is the next one, if anything.
            let rest: &'a [u8] = self.current.get_ref();
            if rest.is_empty() {
                return Ok(0);
            }
            self.members += 1;
            if self.members > MAX_GZIP_MEMBERS {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "too many gzip members",
                ));
            }
            self.current = flate2::bufread::GzDecoder::new(rest);
        }
    }
}

/// Whether a deflate stream starting with `first` is zlib-wrapped (a CMF byte of 0x?8
/// whose window fits), else raw deflate.
fn is_zlib(first: u8) -> bool {
    first & 0x0f == 8 && first >> 4 <= 7
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(encoding: &str, compressed: &[u8], plain: &[u8]) {
        let value = http::HeaderValue::from_str(encoding).unwrap();
        for split in [1, 7, 100, compressed.len().max(1)] {
            let Encoding::Known(mut decoder) = Encoding::of(&headers(value.clone())) else {
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

    fn headers(value: http::HeaderValue) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CONTENT_ENCODING, value);
        headers
    }

    /// Headers saying the body is encoded as `v`.
    fn encoded_as(v: &'static str) -> http::HeaderMap {
        headers(http::HeaderValue::from_static(v))
    }

    fn named(v: &'static str) -> Encoding {
        Encoding::of(&encoded_as(v))
    }

    /// `plain` under each encoding the layer reads.
    fn encoded(plain: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(plain).unwrap();
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(plain).unwrap();
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(plain).unwrap();
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(plain).unwrap();
        }
        vec![
            ("gzip", gz.finish().unwrap()),
            ("deflate", zl.finish().unwrap()),
            ("deflate", raw.finish().unwrap()),
            ("br", br),
            ("zstd", zstd::encode_all(plain, 3).unwrap()),
        ]
    }

    #[test]
    fn gzip_bodies_of_a_few_members_decode_and_of_many_fail() {
        let member = |text: &[u8]| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(text).unwrap();
            gz.finish().unwrap()
        };
        let gzip = encoded_as("gzip");
        // As many members as a body may have: their texts, one after another.
        let few: Vec<u8> = (0..MAX_GZIP_MEMBERS).flat_map(|_| member(b"ab")).collect();
        let decoded = decode_request(&gzip, &few, 1 << 20).unwrap().unwrap();
        assert_eq!(decoded, b"ab".repeat(MAX_GZIP_MEMBERS));
        // One more, or 200 000 empty ones (4 MiB that decode to nothing, a member's
        // setup at a time): refused as corrupt.
        let one_more: Vec<u8> = (0..=MAX_GZIP_MEMBERS).flat_map(|_| member(b"ab")).collect();
        assert_eq!(
            decode_request(&gzip, &one_more, 1 << 20),
            Err(Unreadable::Corrupt)
        );
        let empty = member(b"");
        let many: Vec<u8> = (0..200_000).flat_map(|_| empty.iter().copied()).collect();
        assert_eq!(
            decode_request(&gzip, &many, 4 << 20),
            Err(Unreadable::Corrupt)
        );
        // A member cut short, after a whole one, is corrupt too.
        let mut cut = member(b"ab");
        let second = member(b"cd");
        cut.extend_from_slice(&second[..second.len() - 3]);
        assert_eq!(
            decode_request(&gzip, &cut, 1 << 20),
            Err(Unreadable::Corrupt)
        );
    }

    #[test]
    fn request_bodies_decode_whole_within_the_bound() {
        let plain = br#"{"model":"gpt-4o","messages":[]}"#.repeat(100);
        for (name, body) in encoded(&plain) {
            assert_eq!(
                decode_request(&encoded_as(name), &body, plain.len())
                    .unwrap()
                    .unwrap(),
                plain,
                "{name}"
            );
            assert_eq!(
                decode_request(&encoded_as(name), &body, plain.len() - 1),
                Err(Unreadable::TooLarge),
                "{name}"
            );
            // Cut short, or empty: it does not decode (a quiet end would read as a
            // shorter body, or none).
            for cut in [body.len() / 2, body.len() - 1, 0] {
                assert_eq!(
                    decode_request(&encoded_as(name), &body[..cut], usize::MAX),
                    Err(Unreadable::Corrupt),
                    "{name} cut at {cut}"
                );
            }
        }
        assert_eq!(
            decode_request(&encoded_as("gzip"), b"not gzip", usize::MAX),
            Err(Unreadable::Corrupt)
        );
        assert_eq!(decode_request(&encoded_as("identity"), &plain, 1), Ok(None));
        assert_eq!(
            decode_request(&encoded_as("compress"), &plain, usize::MAX),
            Err(Unreadable::Unsupported("compress".into()))
        );
    }

    #[test]
    fn a_body_that_decodes_to_far_more_than_it_weighs_is_stopped_at_the_bound() {
        // 256 MiB of spaces: brotli makes a few hundred bytes of it, gzip ~250 KiB.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut br = Vec::new();
        let mut zs = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        {
            let mut b = brotli::CompressorWriter::new(&mut br, 4096, 5, 24);
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..256 {
                gz.write_all(&chunk).unwrap();
                b.write_all(&chunk).unwrap();
                zs.write_all(&chunk).unwrap();
            }
        }
        let bombs = [
            ("gzip", gz.finish().unwrap()),
            ("br", br),
            ("zstd", zs.finish().unwrap()),
        ];
        for (name, bomb) in bombs {
            assert_eq!(
                decode_request(&encoded_as(name), &bomb, 4 << 20),
                Err(Unreadable::TooLarge),
                "{name}"
            );
        }
    }

    #[test]
    fn a_piece_of_a_response_that_decodes_to_too_much_fails_instead_of_filling_memory() {
        let mut bomb = Vec::new();
        {
            let mut b = brotli::CompressorWriter::new(&mut bomb, 4096, 5, 24);
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..256 {
                b.write_all(&chunk).unwrap();
            }
        }
        let Encoding::Known(mut decoder) = named("br") else {
            panic!("br is known");
        };
        let mut out = Vec::new();
        let failed = bomb.chunks(256).any(|piece| {
            let result = decoder.write(piece, &mut out);
            assert!(out.len() <= MAX_PIECE_OUTPUT, "{}", out.len());
            out.clear();
            result.is_err()
        });
        assert!(
            failed,
            "256 MiB in {} bytes decoded without an error",
            bomb.len()
        );
    }

    /// Every coding's stream cut short fails to finish (and a whole one finishes): a
    /// body cut short is read as unreadable, not as whole. (A zstd or brotli flush did
    /// not say: a zstd block cut short decoded to nothing, without an error.)
    #[test]
    fn a_stream_cut_short_fails_to_finish() {
        let plain = b"data: {\"usage\":{\"prompt_tokens\":1}}\n\n".repeat(500);
        for (coding, whole) in encoded(&plain) {
            for cut in [whole.len() / 2, whole.len() - 1] {
                let Encoding::Known(mut decoder) = named(coding) else {
                    panic!("{coding} is known");
                };
                let mut out = Vec::new();
                let wrote = decoder.write(&whole[..cut], &mut out);
                let finished = decoder.finish(&mut out);
                assert!(
                    wrote.is_err() || finished.is_err(),
                    "{coding} cut at {cut} of {} finished",
                    whole.len()
                );
            }
            let Encoding::Known(mut decoder) = named(coding) else {
                panic!("{coding} is known");
            };
            let mut out = Vec::new();
            decoder.write(&whole, &mut out).unwrap();
            decoder.finish(&mut out).unwrap();
        }
    }

    /// A zstd stream whose frame asks for a window of `2^window_log` bytes (written in
    /// pieces, so the encoder does not know its size and keeps the window).
    fn zstd_with_window(plain: &[u8], window_log: u32) -> Vec<u8> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(window_log).unwrap();
        for piece in plain.chunks(4096) {
            encoder.write_all(piece).unwrap();
        }
        encoder.finish().unwrap()
    }

    /// A zstd window beyond 8 MiB fails to decode, in a response (whose decoder would
    /// hold it for the whole stream: 128 MiB for window log 27) and in a request body;
    /// one of 8 MiB decodes.
    #[test]
    fn a_zstd_window_beyond_8_mib_does_not_decode() {
        let plain = b"data: {\"usage\":{\"prompt_tokens\":1}}\n\n".repeat(2000);
        roundtrip("zstd", &zstd_with_window(&plain, 23), &plain);
        let headers = encoded_as("zstd");
        let fits = decode_request(&headers, &zstd_with_window(&plain, 23), 1 << 20);
        assert_eq!(fits, Ok(Some(plain.clone())));
        for window_log in [24, 27] {
            let large = zstd_with_window(&plain, window_log);
            let Encoding::Known(mut decoder) = named("zstd") else {
                panic!("zstd is known");
            };
            let mut out = Vec::new();
            assert!(
                decoder.write(&large, &mut out).is_err(),
                "window log {window_log} decoded"
            );
            assert!(out.is_empty(), "window log {window_log}");
            assert_eq!(
                decode_request(&headers, &large, 1 << 20),
                Err(Unreadable::Corrupt),
                "window log {window_log}"
            );
        }
    }

    #[test]
    fn content_encoding_lines_are_read_as_one_list() {
        let mut two = http::HeaderMap::new();
        two.append(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
        two.append(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
        assert!(matches!(Encoding::of(&two), Encoding::Known(d) if matches!(*d, Decoder::Gzip(_))));
        two.append(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_static("br"),
        );
        assert!(matches!(Encoding::of(&two), Encoding::Unknown(n) if n == "gzip, br"));
        assert!(matches!(named(" GZIP , identity"), Encoding::Known(_)));
        assert!(matches!(named("identity"), Encoding::Identity));
        assert!(matches!(
            Encoding::of(&http::HeaderMap::new()),
            Encoding::Identity
        ));
        assert!(matches!(named("gzip, gzip"), Encoding::Unknown(_)));
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
        assert!(matches!(named("compress"), Encoding::Unknown(_)));
    }
}
