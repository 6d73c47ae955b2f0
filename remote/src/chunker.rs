//! Content-defined chunking with a secret gear table: fastcdc's 2020 scan
//! (`cut_gear`) over a table derived from the chunker key, so where a
//! stream is cut, and so how large its chunks are, cannot be computed
//! without the key. The scan reads at most `max` bytes ahead: memory is
//! bounded whatever the stream's size.

use std::io::Read;

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::{cut_gear, select_masks, Normalization};
use serde::{Deserialize, Serialize};

use crate::keys::Keys;

/// Chunk sizes in bytes. The defaults (256 KiB, 1 MiB, 4 MiB) are
/// restic's order of magnitude: large enough that a checkpoint of
/// gigabytes is thousands of objects, not millions, small enough that a
/// small change uploads about a megabyte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSizes {
    pub min: usize,
    pub avg: usize,
    pub max: usize,
}

impl Default for ChunkSizes {
    fn default() -> Self {
        ChunkSizes {
            min: 256 << 10,
            avg: 1 << 20,
            max: 4 << 20,
        }
    }
}

impl ChunkSizes {
    /// fastcdc's bounds, and even sizes (its scan steps two bytes).
    pub fn validate(&self) -> Result<(), String> {
        use fastcdc::v2020::*;
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max)
            && self.min < self.avg
            && self.avg < self.max
            && self.min.is_multiple_of(2)
            && self.avg.is_multiple_of(2)
            && self.max.is_multiple_of(2);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "chunk sizes {self:?} must be even, min < avg < max, min in {MINIMUM_MIN}..={MINIMUM_MAX}, avg in {AVERAGE_MIN}..={AVERAGE_MAX}, max in {MAXIMUM_MIN}..={MAXIMUM_MAX}"
            ))
        }
    }
}

/// Cuts a byte stream into chunks.
pub(crate) struct Chunker<R> {
    source: R,
    sizes: ChunkSizes,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
    masks: (u64, u64),
    buf: BytesMut,
    eof: bool,
}

impl<R: Read> Chunker<R> {
    pub(crate) fn new(source: R, keys: &Keys, sizes: ChunkSizes) -> Self {
        let gear = Box::new(keys.gear_table());
        let mut gear_ls = Box::new([0u64; 256]);
        for (ls, g) in gear_ls.iter_mut().zip(gear.iter()) {
            *ls = g << 1;
        }
        Chunker {
            source,
            sizes,
            gear,
            gear_ls,
            masks: select_masks(sizes.avg, Normalization::Level1),
            buf: BytesMut::with_capacity(2 * sizes.max),
            eof: false,
        }
    }

    /// Fills the buffer to `max` bytes, or to the end of the stream.
    fn fill(&mut self) -> std::io::Result<()> {
        while !self.eof && self.buf.len() < self.sizes.max {
            let len = self.buf.len();
            self.buf.resize(self.sizes.max, 0);
            match self.source.read(&mut self.buf[len..]) {
                Ok(0) => {
                    self.buf.truncate(len);
                    self.eof = true;
                }
                Ok(n) => self.buf.truncate(len + n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => self.buf.truncate(len),
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The next chunk, `None` at the end of the stream.
    pub(crate) fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        self.fill()?;
        if self.buf.is_empty() {
            return Ok(None);
        }
        let (mask_s, mask_l) = self.masks;
        let (_, cut) = cut_gear(
            &self.buf,
            self.sizes.min,
            self.sizes.avg,
            self.sizes.max,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
            &self.gear[..],
            &self.gear_ls[..],
        );
        let chunk = self.buf.split_to(cut.max(1).min(self.buf.len())).freeze();
        if self.buf.capacity() < self.sizes.max {
            self.buf.reserve(2 * self.sizes.max);
        }
        Ok(Some(chunk))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic bytes that do not compress, without a RNG crate.
    pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    fn chunks(keys: &Keys, data: &[u8], sizes: ChunkSizes) -> Vec<Bytes> {
        // A reader that returns short reads, as a pipe does.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(65536);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut c = Chunker::new(Trickle(data), keys, sizes);
        let mut out = Vec::new();
        while let Some(chunk) = c.next_chunk().unwrap() {
            out.push(chunk);
        }
        out
    }

    #[test]
    fn chunks_cover_the_stream_within_bounds_and_depend_on_the_key() {
        let sizes = ChunkSizes::default();
        sizes.validate().unwrap();
        let data = noise(1, 24 << 20);
        let keys = Keys::generate();
        let a = chunks(&keys, &data, sizes);
        assert_eq!(a.concat(), data);
        for c in &a[..a.len() - 1] {
            assert!(c.len() >= sizes.min && c.len() <= sizes.max, "{}", c.len());
        }
        // Content-defined: the same data cuts the same way...
        assert_eq!(
            chunks(&keys, &data, sizes)
                .iter()
                .map(Bytes::len)
                .collect::<Vec<_>>(),
            a.iter().map(Bytes::len).collect::<Vec<_>>()
        );
        // ...and another key cuts it elsewhere.
        let b = chunks(&Keys::generate(), &data, sizes);
        assert_ne!(
            b.iter().map(Bytes::len).collect::<Vec<_>>(),
            a.iter().map(Bytes::len).collect::<Vec<_>>()
        );
        assert!(chunks(&keys, &[], sizes).is_empty());
    }
}
