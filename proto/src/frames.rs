use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_serde::formats::MessagePack;
use tokio_util::codec::{Decoder, FramedRead, FramedWrite, LengthDelimitedCodec};

/// The largest frame either side accepts. Exec output travels in chunks of
/// at most 64 KiB, so anything near this limit is a broken or hostile peer;
/// a larger length prefix is refused before a byte of it is buffered.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// The length prefix: 4 bytes, big-endian.
const HEAD_LEN: usize = 4;

/// The read half of a framed link, yielding `T`.
pub type FrameReader<R, T> =
    tokio_serde::Framed<FramedRead<R, FrameDecoder>, T, (), MessagePack<T, ()>>;

/// The write half of a framed link, accepting `T`.
pub type FrameWriter<W, T> =
    tokio_serde::Framed<FramedWrite<W, LengthDelimitedCodec>, (), T, MessagePack<(), T>>;

/// Length-delimited frames in, as `LengthDelimitedCodec` reads them, except
/// that the buffer grows only as a frame's bytes arrive: that codec reserves
/// the whole declared length as soon as it reads the prefix, so a peer that
/// declares a large frame and sends a few bytes costs the full length.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        FrameDecoder { max }
    }
}

impl Decoder for FrameDecoder {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        let Some(head) = src.get(..HEAD_LEN) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; HEAD_LEN];
        len_bytes.copy_from_slice(head);
        let len = usize::try_from(u32::from_be_bytes(len_bytes)).unwrap_or(usize::MAX);
        if len > self.max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a frame of {len} bytes is over this endpoint's limit of {} bytes",
                    self.max
                ),
            ));
        }
        if src.len() < HEAD_LEN + len {
            return Ok(None);
        }
        src.advance(HEAD_LEN);
        Ok(Some(src.split_to(len)))
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

pub fn frame_reader<R: AsyncRead, T>(io: R) -> FrameReader<R, T> {
    frame_reader_max(io, MAX_FRAME_LEN)
}

/// A reader that refuses frames over `max` bytes, for endpoints whose
/// legitimate messages are all small.
pub fn frame_reader_max<R: AsyncRead, T>(io: R, max: usize) -> FrameReader<R, T> {
    tokio_serde::Framed::new(
        FramedRead::new(io, FrameDecoder::new(max)),
        MessagePack::default(),
    )
}

pub fn frame_writer<W: AsyncWrite, T>(io: W) -> FrameWriter<W, T> {
    tokio_serde::Framed::new(FramedWrite::new(io, codec()), MessagePack::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::Encoder;

    fn framed(body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        codec()
            .encode(bytes::Bytes::copy_from_slice(body), &mut out)
            .unwrap();
        out
    }

    #[test]
    fn frames_decode_what_the_writer_encodes_in_any_split() {
        let mut wire = framed(b"hello");
        wire.extend_from_slice(&framed(b""));
        wire.extend_from_slice(&framed(b"world!"));
        for cut in 0..wire.len() {
            let mut d = FrameDecoder::new(16);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(f);
            }
            assert_eq!(got, [&b"hello"[..], b"", b"world!"], "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn frames_over_the_limit_are_refused_from_their_prefix() {
        let mut d = FrameDecoder::new(8);
        let mut buf = BytesMut::from(&framed(b"123456789")[..HEAD_LEN]);
        let err = d.decode(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("limit of 8 bytes"), "{err}");
    }

    #[test]
    fn frames_reserve_nothing_for_a_declared_length() {
        let mut d = FrameDecoder::new(MAX_FRAME_LEN);
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&u32::try_from(MAX_FRAME_LEN).unwrap().to_be_bytes());
        buf.extend_from_slice(b"abc");
        assert!(d.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() < 1024, "capacity {}", buf.capacity());
    }
}
