//! A writer of the "newc" cpio format the kernel unpacks an initramfs from
//! (Documentation/driver-api/early-userspace/buffer-format.rst). Entries
//! carry no time, owner or host inode, so the same tree gives the same
//! bytes. The `cpio` crate writes one entry at a time well but has not
//! changed in years and would still need the tree walk, the parents and
//! the ordering here; this is the rest of it.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    /// A regular file whose bytes are read from this host path.
    File(PathBuf),
    /// A regular file with these bytes.
    Bytes(Vec<u8>),
    Symlink(String),
    CharDevice {
        major: u32,
        minor: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    /// Permission bits only; the type comes from `kind`.
    pub mode: u32,
}

/// The tree an archive holds, by path without the leading slash, written
/// parents first (the kernel needs a directory before what is in it).
#[derive(Debug, Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    /// Adds `path` (and every missing parent, as a 0755 directory); a later
    /// insert of the same path replaces the earlier.
    pub fn insert(&mut self, path: &str, kind: EntryKind, mode: u32) {
        let path = path.trim_matches('/').to_owned();
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Entry {
                kind: EntryKind::Dir,
                mode: 0o755,
            });
        }
        self.entries.insert(path, Entry { kind, mode });
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path.trim_matches('/'))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the archive. Paths sort so that a directory comes before
    /// what it holds ("a" < "a/b").
    pub fn write(&self, out: &mut dyn Write) -> io::Result<u64> {
        let mut written = 0u64;
        for (index, (path, entry)) in self.entries.iter().enumerate() {
            let ino = u32::try_from(index + 1).unwrap_or(u32::MAX);
            let (type_bits, data, rdev, nlink): (u32, Data, (u32, u32), u32) = match &entry.kind {
                EntryKind::Dir => (0o040000, Data::None, (0, 0), 2),
                EntryKind::File(source) => (0o100000, Data::File(source), (0, 0), 1),
                EntryKind::Bytes(bytes) => (0o100000, Data::Bytes(bytes), (0, 0), 1),
                EntryKind::Symlink(target) => (0o120000, Data::Bytes(target.as_bytes()), (0, 0), 1),
                EntryKind::CharDevice { major, minor } => {
                    (0o020000, Data::None, (*major, *minor), 1)
                }
            };
            let size = match data {
                Data::None => 0,
                Data::Bytes(b) => b.len() as u64,
                Data::File(p) => std::fs::metadata(p)?.len(),
            };
            let size = u32::try_from(size).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{path} is over 4 GiB"))
            })?;
            written += header(
                out,
                ino,
                type_bits | (entry.mode & 0o7777),
                nlink,
                size,
                rdev,
                path,
            )?;
            let copied = match data {
                Data::None => 0,
                Data::Bytes(b) => {
                    out.write_all(b)?;
                    b.len() as u64
                }
                Data::File(p) => {
                    let copied = io::copy(&mut std::fs::File::open(p)?.take(u64::from(size)), out)?;
                    if copied != u64::from(size) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{} changed while it was archived", p.display()),
                        ));
                    }
                    copied
                }
            };
            written += copied + pad(out, copied)?;
        }
        written += header(out, 0, 0, 1, 0, (0, 0), "TRAILER!!!")?;
        Ok(written)
    }
}

enum Data<'a> {
    None,
    Bytes(&'a [u8]),
    File(&'a PathBuf),
}

fn header(
    out: &mut dyn Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<u64> {
    let name_size = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
    // devminor, rdevmajor, rdevminor, namesize, check.
    let text = format!(
        "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{name_size:08X}{:08X}{name}\0",
        0, 0, 0, 0, 0, rdev.0, rdev.1, 0
    );
    out.write_all(text.as_bytes())?;
    let len = text.len() as u64;
    Ok(len + pad(out, len)?)
}

/// Pads to the format's 4-byte alignment.
fn pad(out: &mut dyn Write, len: u64) -> io::Result<u64> {
    let padding = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..usize::try_from(padding).unwrap_or(0)])?;
    Ok(padding)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(header: &[u8], index: usize) -> u32 {
        let start = 6 + index * 8;
        u32::from_str_radix(std::str::from_utf8(&header[start..start + 8]).unwrap(), 16).unwrap()
    }

    #[test]
    fn writes_newc_entries_parents_first_and_aligned() {
        let mut tree = Tree::default();
        tree.insert("/usr/bin/tool", EntryKind::Bytes(b"hello".to_vec()), 0o755);
        tree.insert(
            "dev/console",
            EntryKind::CharDevice { major: 5, minor: 1 },
            0o600,
        );
        tree.insert("bin/sh", EntryKind::Symlink("busybox".into()), 0o777);
        let mut out = Vec::new();
        let written = tree.write(&mut out).unwrap();
        assert_eq!(written, out.len() as u64);
        assert_eq!(out.len() % 4, 0);

        // Walk the archive back.
        let mut names = Vec::new();
        let mut at = 0;
        loop {
            let h = &out[at..];
            assert_eq!(&h[..6], b"070701");
            let mode = field(h, 1);
            let size = field(h, 6) as usize;
            let name_size = field(h, 11) as usize;
            let name = std::str::from_utf8(&h[110..110 + name_size - 1])
                .unwrap()
                .to_owned();
            assert_eq!(h[110 + name_size - 1], 0);
            let data_at = (110 + name_size).div_ceil(4) * 4;
            let data = &h[data_at..data_at + size];
            match name.as_str() {
                "usr/bin/tool" => {
                    assert_eq!(mode, 0o100755);
                    assert_eq!(data, b"hello");
                }
                "dev/console" => {
                    assert_eq!(mode, 0o020600);
                    assert_eq!((field(h, 9), field(h, 10)), (5, 1));
                }
                "bin/sh" => {
                    assert_eq!(mode, 0o120777);
                    assert_eq!(data, b"busybox");
                }
                "usr" | "usr/bin" | "dev" | "bin" => assert_eq!(mode, 0o040755),
                "TRAILER!!!" => {
                    names.push(name);
                    break;
                }
                other => panic!("unexpected entry {other}"),
            }
            names.push(name);
            at += (data_at + size).div_ceil(4) * 4;
        }
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "usr",
                "usr/bin",
                "usr/bin/tool",
                "TRAILER!!!"
            ]
        );
        assert_eq!(
            at + (110 + 11usize).div_ceil(4) * 4,
            out.len(),
            "the trailer ends the archive"
        );
    }

    #[test]
    fn the_same_tree_gives_the_same_bytes() {
        let build = || {
            let mut tree = Tree::default();
            tree.insert("b", EntryKind::Bytes(vec![1, 2, 3]), 0o644);
            tree.insert("a/x", EntryKind::Dir, 0o700);
            let mut out = Vec::new();
            tree.write(&mut out).unwrap();
            out
        };
        assert_eq!(build(), build());
    }
}
