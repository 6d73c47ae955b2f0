use tokio::io::{AsyncRead, AsyncWrite};
use tokio_serde::formats::MessagePack;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// The largest frame either side accepts. Exec output travels in chunks of
/// at most 64 KiB, so anything near this limit is a broken or hostile peer;
/// a larger length prefix is refused before a byte of it is buffered.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// The read half of a framed link, yielding `T`.
pub type FrameReader<R, T> =
    tokio_serde::Framed<FramedRead<R, LengthDelimitedCodec>, T, (), MessagePack<T, ()>>;

/// The write half of a framed link, accepting `T`.
pub type FrameWriter<W, T> =
    tokio_serde::Framed<FramedWrite<W, LengthDelimitedCodec>, (), T, MessagePack<(), T>>;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

pub fn frame_reader<R: AsyncRead, T>(io: R) -> FrameReader<R, T> {
    tokio_serde::Framed::new(FramedRead::new(io, codec()), MessagePack::default())
}

pub fn frame_writer<W: AsyncWrite, T>(io: W) -> FrameWriter<W, T> {
    tokio_serde::Framed::new(FramedWrite::new(io, codec()), MessagePack::default())
}
