//! The random seed carried from one boot to the next on the data disk, as
//! systemd-random-seed carries it: read early and mixed into the kernel's
//! pool, replaced at once by a new one, and written again at shutdown.
//!
//! A seed is credited (counted as entropy, RNDADDENTROPY) only when it is
//! fresh: written by hull-init (the file starts with its magic) and gone
//! from the disk before it is credited, so no later boot reads it again.
//! The new seed is written after the kernel's pool is ready and so is as
//! good as anything getrandom(2) gives. A seed that does not start with
//! the magic (put there by something else) or that could not be removed is
//! mixed in uncredited: mixing never hurts, a false credit does. The one
//! case this cannot see is a copy of the data disk booted beside its
//! original; both credit the same seed, and still differ by what is mixed
//! in uncredited (the kernel command line, with the host's per-run token
//! hash) and by the virtio RNG.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The seed's file in the state directory.
pub const FILE: &str = ".random-seed";
/// What a seed file starts with, then one byte for when it was written.
const MAGIC: &[u8; 8] = b"hullrs1\n";
/// The seed's size: the kernel's pool takes 256 bits, and a larger seed
/// costs nothing.
pub const SEED_BYTES: usize = 512;
/// The kernel's `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// When a seed was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Boot,
    Shutdown,
}

impl Written {
    fn tag(self) -> u8 {
        match self {
            Written::Boot => b'B',
            Written::Shutdown => b'S',
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Written::Shutdown => "written at the last shutdown",
            Written::Boot => "written at the last boot, which did not shut down cleanly",
        }
    }
}

/// A seed read from the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub bytes: Vec<u8>,
    /// hull-init wrote it, and when; `None` for a file of another origin.
    pub written: Option<Written>,
    /// It is gone from the disk: no later boot reads it again.
    pub removed: bool,
}

impl Found {
    /// The bits to credit: every bit of a fresh seed of hull-init's, none
    /// of any other.
    pub fn credit_bits(&self) -> u32 {
        if self.written.is_some() && self.removed {
            u32::try_from(self.bytes.len() * 8).unwrap_or(u32::MAX)
        } else {
            0
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot read the random seed {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot add the random seed to the kernel's pool through /dev/urandom")]
    Mix(#[source] io::Error),
    #[error("cannot draw a new random seed")]
    Draw(#[source] io::Error),
    #[error("cannot write the random seed {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The seed file's contents: its origin, when it is hull-init's.
pub fn parse(contents: &[u8]) -> (Option<Written>, &[u8]) {
    let Some(rest) = contents.strip_prefix(MAGIC.as_slice()) else {
        return (None, contents);
    };
    match rest.split_first() {
        Some((b'S', seed)) if !seed.is_empty() => (Some(Written::Shutdown), seed),
        Some((b'B', seed)) if !seed.is_empty() => (Some(Written::Boot), seed),
        _ => (None, contents),
    }
}

/// Reads `DIR/.random-seed` and removes it (the removal on the disk before
/// this returns); `None` when there is none.
pub fn take(dir: &Path) -> Result<Option<Found>, SeedError> {
    let path = dir.join(FILE);
    let contents = match fs::read(&path) {
        Ok(contents) => contents,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SeedError::Read { path, source }),
    };
    let removed = fs::remove_file(&path).is_ok() && sync_dir(dir).is_ok();
    let (written, seed) = parse(&contents);
    // The kernel reads at most this much of a write to its pool at once;
    // more would be mixed in but tells nothing more.
    let bytes = seed[..seed.len().min(SEED_BYTES)].to_vec();
    Ok(Some(Found {
        bytes,
        written,
        removed,
    }))
}

/// `rand_pool_info` for RNDADDENTROPY: the bits to credit, the length,
/// then the bytes, as 32-bit words.
fn pool_info(seed: &[u8], credit_bits: u32) -> Vec<u32> {
    let mut words = Vec::with_capacity(2 + seed.len().div_ceil(4));
    words.push(credit_bits);
    words.push(u32::try_from(seed.len()).unwrap_or(u32::MAX));
    for chunk in seed.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        words.push(u32::from_ne_bytes(word));
    }
    words
}

/// Mixes `seed` into the kernel's pool, crediting `credit_bits` of it.
pub fn mix(seed: &[u8], credit_bits: u32) -> Result<(), SeedError> {
    let urandom = fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(SeedError::Mix)?;
    let mut info = pool_info(seed, credit_bits);
    // SAFETY: RNDADDENTROPY reads one `struct rand_pool_info` whose
    // buf_size bytes follow its two ints; `info` holds exactly that, and
    // lives for the whole call.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_mut_ptr()) };
    if rc < 0 {
        return Err(SeedError::Mix(io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether the kernel's pool is ready: getrandom(2) would not block.
pub fn pool_ready() -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: getrandom(2) writes at most one byte into `byte`.
    let n = unsafe { libc::getrandom(byte.as_mut_ptr().cast(), 1, libc::GRND_NONBLOCK) };
    n == 1
}

/// Fills `buf` from getrandom(2) with `flags`: without GRND_NONBLOCK it
/// waits for the pool if it must.
fn draw(buf: &mut [u8], flags: libc::c_uint) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom(2) writes at most `rest.len()` bytes into
        // `rest`, which lives for the whole call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

/// Writes a new seed to `DIR/.random-seed` (mode 0600): beside, synced,
/// renamed in, the directory synced. At boot (`Written::Boot`) it never
/// waits for the kernel's pool: false when the pool is not ready, and the
/// seed is left to the shutdown. At shutdown it waits (the pool is ready
/// by then, or within the seconds the kernel's jitter entropy takes).
pub fn save(dir: &Path, written: Written) -> Result<bool, SeedError> {
    let mut seed = vec![0u8; SEED_BYTES];
    let flags = match written {
        Written::Boot => libc::GRND_NONBLOCK,
        Written::Shutdown => 0,
    };
    match draw(&mut seed, flags) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(SeedError::Draw(e)),
    }
    let path = dir.join(FILE);
    let staging = dir.join(format!("{FILE}.new"));
    let error = |source| SeedError::Write {
        path: path.clone(),
        source,
    };
    let _ = fs::remove_file(&staging);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .map_err(error)?;
    file.write_all(MAGIC).map_err(error)?;
    file.write_all(&[written.tag()]).map_err(error)?;
    file.write_all(&seed).map_err(error)?;
    file.sync_all().map_err(error)?;
    fs::rename(&staging, &path).map_err(error)?;
    sync_dir(dir).map_err(error)?;
    Ok(true)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_saved_seed_is_taken_once_and_credited_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(save(dir.path(), Written::Shutdown).unwrap());
        let path = dir.path().join(FILE);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), (MAGIC.len() + 1 + SEED_BYTES) as u64);
        let found = take(dir.path()).unwrap().unwrap();
        assert_eq!(found.written, Some(Written::Shutdown));
        assert!(found.removed);
        assert_eq!(found.bytes.len(), SEED_BYTES);
        assert_eq!(found.credit_bits(), 4096);
        assert!(!path.exists(), "the seed is gone before it is credited");
        assert_eq!(take(dir.path()).unwrap(), None, "read once");

        // This machine's pool is long ready: the boot's seed is written.
        assert!(save(dir.path(), Written::Boot).unwrap());
        let again = take(dir.path()).unwrap().unwrap();
        assert_eq!(again.written, Some(Written::Boot));
        assert_ne!(again.bytes, found.bytes, "each seed is new");
    }

    #[test]
    fn a_seed_of_another_origin_or_one_left_behind_is_not_credited() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), [7u8; 512]).unwrap();
        let foreign = take(dir.path()).unwrap().unwrap();
        assert_eq!(foreign.written, None);
        assert_eq!(foreign.bytes, [7u8; 512]);
        assert_eq!(foreign.credit_bits(), 0);

        let stuck = Found {
            bytes: vec![1; 512],
            written: Some(Written::Shutdown),
            removed: false,
        };
        assert_eq!(stuck.credit_bits(), 0, "it would be read again");
    }

    #[test]
    fn the_file_format_is_magic_tag_seed() {
        let mut contents = MAGIC.to_vec();
        contents.push(b'S');
        contents.extend_from_slice(b"seed");
        assert_eq!(parse(&contents), (Some(Written::Shutdown), &b"seed"[..]));
        contents[MAGIC.len()] = b'X';
        assert_eq!(parse(&contents).0, None, "an unknown tag");
        assert_eq!(parse(MAGIC).0, None, "no seed after the magic");
        assert_eq!(parse(b"hullrs1\nB").0, None);
    }

    #[test]
    fn the_kernel_takes_the_layout_uncredited() {
        // Root, as the tests run: RNDADDENTROPY needs CAP_SYS_ADMIN. No
        // credit: mixing bytes in changes nothing anyone relies on.
        mix(&[0x5a; 64], 0).unwrap();
    }

    #[test]
    fn pool_info_is_the_kernels_layout() {
        let words = pool_info(&[1, 2, 3, 4, 5], 40);
        assert_eq!(words[0], 40);
        assert_eq!(words[1], 5);
        assert_eq!(words[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(words[3], u32::from_ne_bytes([5, 0, 0, 0]));
        assert_eq!(words.len(), 4);
    }
}
