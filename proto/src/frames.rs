use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_serde::formats::MessagePack;
use tokio_util::codec::{Decoder, FramedRead, FramedWrite, LengthDelimitedCodec};

/// The largest frame a reader accepts unless told otherwise: every request
/// to hulld, and the init link. Exec output travels in chunks of at most
/// 64 KiB, so anything near this limit is a broken or hostile peer; a
/// larger length prefix is refused before a byte of it is buffered.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// The largest answer hulld sends and a client reads: a list of every
/// service holds up to 256 definitions of up to 64 KiB each.
pub const MAX_REPLY_LEN: usize = 32 * 1024 * 1024;

/// The length prefix: 4 bytes, big-endian.
const HEAD_LEN: usize = 4;

/// The read half of a framed link, yielding `T`.
pub type FrameReader<R, T> =
    tokio_serde::Framed<FramedRead<R, FrameDecoder>, T, (), MessagePack<T, ()>>;

/// The write half of a framed link, accepting `T`.
pub type FrameWriter<W, T> =
    tokio_serde::Framed<FramedWrite<W, LengthDelimitedCodec>, (), T, MessagePack<(), T>>;

/// Frames up to this size are read on a connection's own account; a
/// larger one first takes its length from the [`FrameBudget`].
pub const SMALL_FRAME: usize = 64 * 1024;

/// The bytes of large frames being read at once, shared by every
/// connection of a hulld: a cap per connection times the connections
/// allowed is far more memory than hulld has, and only a few large
/// requests are ever legitimately in flight together.
#[derive(Debug)]
pub struct FrameBudget {
    total: usize,
    free: AtomicUsize,
}

impl FrameBudget {
    pub fn new(total: usize) -> Arc<FrameBudget> {
        Arc::new(FrameBudget {
            total,
            free: AtomicUsize::new(total),
        })
    }

    fn take(&self, n: usize) -> bool {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(n)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.free.fetch_add(n, Ordering::AcqRel);
    }

    /// Bytes not taken by a frame being read.
    pub fn free(&self) -> usize {
        self.free.load(Ordering::Acquire)
    }
}

/// A large frame that did not fit in what the [`FrameBudget`] had left.
#[derive(Debug, thiserror::Error)]
#[error(
    "hulld is reading {} KiB of large requests from other clients; a frame of {len} bytes does not fit in the {} KiB it reads at once",
    (.total - .free) / 1024,
    .total / 1024
)]
pub struct FrameBusy {
    pub len: usize,
    pub free: usize,
    pub total: usize,
}

impl FrameBusy {
    /// The [`FrameBusy`] inside an error a frame reader yielded.
    pub fn of(e: &io::Error) -> Option<&FrameBusy> {
        e.get_ref()?.downcast_ref::<FrameBusy>()
    }
}

/// Length-delimited frames in, as `LengthDelimitedCodec` reads them, except
/// that the buffer grows only as a frame's bytes arrive: that codec reserves
/// the whole declared length as soon as it reads the prefix, so a peer that
/// declares a large frame and sends a few bytes costs the full length. A
/// decoder with a [`FrameBudget`] takes a large frame's length from it
/// before reading on, and gives it back once the frame is out (or the
/// decoder dropped).
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    budget: Option<Arc<FrameBudget>>,
    held: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            max,
            budget: None,
            held: 0,
        }
    }

    /// A decoder whose frames over [`SMALL_FRAME`] draw on `budget`.
    pub fn with_budget(max: usize, budget: Arc<FrameBudget>) -> Self {
        FrameDecoder {
            max,
            budget: Some(budget),
            held: 0,
        }
    }

    fn hold(&mut self, len: usize) -> io::Result<()> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        if len <= SMALL_FRAME || self.held >= len {
            return Ok(());
        }
        if !budget.take(len) {
            return Err(io::Error::other(FrameBusy {
                len,
                free: budget.free(),
                total: budget.total,
            }));
        }
        self.held = len;
        Ok(())
    }

    fn release(&mut self) {
        if let Some(budget) = &self.budget {
            budget.give(std::mem::take(&mut self.held));
        }
    }
}

impl Drop for FrameDecoder {
    fn drop(&mut self) {
        self.release();
    }
}

impl FrameDecoder {
    /// The length the next frame in `src` declares, once its prefix is
    /// there; an error when it is over this decoder's limit.
    pub(crate) fn next_len(&self, src: &[u8]) -> io::Result<Option<usize>> {
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
        Ok(Some(len))
    }
}

/// The bytes of a frame's length prefix.
pub(crate) const FRAME_HEAD_LEN: usize = HEAD_LEN;

impl Decoder for FrameDecoder {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        let Some(len) = self.next_len(src)? else {
            return Ok(None);
        };
        self.hold(len)?;
        if src.len() < HEAD_LEN + len {
            return Ok(None);
        }
        src.advance(HEAD_LEN);
        let frame = src.split_to(len);
        self.release();
        Ok(Some(frame))
    }
}

// Writers are bounded by what they are given; the reader at the other
// end holds its own limit.
fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_REPLY_LEN)
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
    fn large_frames_share_one_budget_and_give_it_back() {
        let budget = FrameBudget::new(3 * SMALL_FRAME);
        let big = vec![7u8; 2 * SMALL_FRAME];
        let wire = framed(&big);
        let mut first = FrameDecoder::with_budget(MAX_FRAME_LEN, budget.clone());
        let mut second = FrameDecoder::with_budget(MAX_FRAME_LEN, budget.clone());
        // The first has its prefix and part of its body: it holds its length.
        let mut a = BytesMut::from(&wire[..100]);
        assert!(first.decode(&mut a).unwrap().is_none());
        assert_eq!(budget.free(), SMALL_FRAME);
        // The second does not fit and is told why.
        let mut b = BytesMut::from(&wire[..100]);
        let busy = second.decode(&mut b).unwrap_err();
        assert!(FrameBusy::of(&busy).is_some(), "{busy}");
        // Small frames never wait on the budget.
        let mut small = BytesMut::from(&framed(b"hi")[..]);
        assert_eq!(&second.decode(&mut small).unwrap().unwrap()[..], b"hi");
        // A finished frame gives its share back, and so does a dropped
        // decoder with a frame half read.
        a.extend_from_slice(&wire[100..]);
        assert_eq!(first.decode(&mut a).unwrap().unwrap().len(), big.len());
        assert_eq!(budget.free(), 3 * SMALL_FRAME);
        let mut c = BytesMut::from(&wire[..100]);
        assert!(second.decode(&mut c).unwrap().is_none());
        assert_eq!(budget.free(), SMALL_FRAME);
        drop(second);
        assert_eq!(budget.free(), 3 * SMALL_FRAME);
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
