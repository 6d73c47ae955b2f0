//! A tree's manifest: every file, directory, symlink and special file
//! under a root with what `btrfs send`/`receive` must carry over (kind,
//! mode, owner, extended attributes, which paths share an inode, where a
//! file's data and holes are, its content's SHA-256, a symlink's target),
//! so that two trees compare as identical or the difference names the
//! path.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Each path under the root (the root itself as `.`) and its description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeManifest {
    pub entries: BTreeMap<PathBuf, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The extended attributes of `path` (not followed), names sorted, each
/// value hashed.
fn xattrs(path: &Path) -> Vec<String> {
    let mut names = vec![0u8; 64 << 10];
    let len = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(len) => len,
        Err(rustix::io::Errno::NOTSUP) => return Vec::new(),
        Err(e) => panic!("llistxattr {}: {e}", path.display()),
    };
    let mut out: Vec<String> = names[..len]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let name = std::ffi::OsStr::from_bytes(name);
            let mut value = vec![0u8; 64 << 10];
            let n = rustix::fs::lgetxattr(path, name, &mut value[..])
                .unwrap_or_else(|e| panic!("lgetxattr {} {name:?}: {e}", path.display()));
            format!(
                "{}={}",
                name.to_string_lossy(),
                hex(&Sha256::digest(&value[..n]))
            )
        })
        .collect();
    out.sort();
    out
}

/// The data extents of a file as SEEK_DATA/SEEK_HOLE report them.
fn data_extents(file: &fs::File, len: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{seek, SeekFrom};
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match seek(file, SeekFrom::Data(at)) {
            Ok(start) => start,
            // No data after `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        let end = seek(file, SeekFrom::Hole(start)).unwrap_or_else(|e| panic!("SEEK_HOLE: {e}"));
        out.push((start, end));
        at = end;
    }
    out
}

impl TreeManifest {
    /// Walks `root` (not following symlinks) and describes every entry.
    pub fn of(root: &Path) -> TreeManifest {
        let mut entries = BTreeMap::new();
        // The first path (in sorted order) of each inode with more than one link.
        let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
        let mut paths = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(path) = todo.pop() {
            let is_dir = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
                .is_dir();
            if is_dir {
                for entry in fs::read_dir(&path)
                    .unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()))
                {
                    todo.push(entry.unwrap().path());
                }
            }
            paths.push(path);
        }
        // Sorted, so the first name of a hard-linked inode is the same
        // in two trees with the same names.
        paths.sort();
        for path in paths {
            let meta = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            let rel = match path.strip_prefix(root).unwrap() {
                p if p.as_os_str().is_empty() => PathBuf::from("."),
                p => p.to_path_buf(),
            };
            let kind = meta.file_type();
            let mut line = format!(
                "{} uid={} gid={}",
                if kind.is_dir() {
                    "dir"
                } else if kind.is_symlink() {
                    "symlink"
                } else if kind.is_file() {
                    "file"
                } else if kind.is_fifo() {
                    "fifo"
                } else if kind.is_socket() {
                    "socket"
                } else {
                    "device"
                },
                meta.uid(),
                meta.gid()
            );
            if !kind.is_symlink() {
                line += &format!(" mode={:o}", meta.mode() & 0o7777);
            }
            let xattrs = xattrs(&path);
            if !xattrs.is_empty() {
                line += &format!(" xattrs=[{}]", xattrs.join(","));
            }
            if !kind.is_dir() && meta.nlink() > 1 {
                let first = inodes
                    .entry((meta.dev(), meta.ino()))
                    .or_insert_with(|| rel.clone());
                line += &format!(" link={}", first.display());
            }
            if kind.is_symlink() {
                let target = fs::read_link(&path).unwrap();
                line += &format!(" target={}", target.display());
            } else if kind.is_file() {
                let mut file = fs::File::open(&path)
                    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                let extents = data_extents(&file, meta.len());
                let mut hasher = Sha256::new();
                std::io::copy(&mut file, &mut hasher).unwrap();
                line += &format!(
                    " size={} data={extents:?} sha256={}",
                    meta.len(),
                    hex(&hasher.finalize())
                );
            } else if kind.is_block_device() || kind.is_char_device() {
                line += &format!(" rdev={:x}", meta.rdev());
            }
            entries.insert(rel, line);
        }
        TreeManifest { entries }
    }

    /// One SHA-256 of the whole manifest.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (path, line) in &self.entries {
            hasher.update(path.as_os_str().as_bytes());
            hasher.update([0]);
            hasher.update(line.as_bytes());
            hasher.update([b'\n']);
        }
        hex(&hasher.finalize())
    }

    /// Every difference from `other`, each naming its path; empty when the
    /// trees are the same.
    pub fn diff(&self, other: &TreeManifest) -> Vec<String> {
        let mut out = Vec::new();
        for (path, line) in &self.entries {
            match other.entries.get(path) {
                None => out.push(format!(
                    "{}: only in the first tree ({line})",
                    path.display()
                )),
                Some(theirs) if theirs != line => out.push(format!(
                    "{}: {line}\n  differs from {theirs}",
                    path.display()
                )),
                Some(_) => {}
            }
        }
        for (path, line) in &other.entries {
            if !self.entries.contains_key(path) {
                out.push(format!(
                    "{}: only in the second tree ({line})",
                    path.display()
                ));
            }
        }
        out
    }
}

/// The manifest of the tree under `root`.
pub fn tree_manifest(root: &Path) -> TreeManifest {
    TreeManifest::of(root)
}

/// Panics, naming every differing path, unless the trees under `a` and
/// `b` are the same.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let diff = tree_manifest(a).diff(&tree_manifest(b));
    assert!(
        diff.is_empty(),
        "{} and {} differ:\n{}",
        a.display(),
        b.display(),
        diff.join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::PermissionsExt;

    /// A tree with one of each thing the manifest records.
    fn fixture(root: &Path) {
        fs::create_dir_all(root.join("dir/sub")).unwrap();
        fs::write(root.join("dir/file"), b"some content").unwrap();
        fs::write(root.join("dir/linked"), b"two names").unwrap();
        fs::hard_link(root.join("dir/linked"), root.join("other-name")).unwrap();
        std::os::unix::fs::symlink("dir/file", root.join("symlink")).unwrap();
        let mut sparse = fs::File::create(root.join("sparse")).unwrap();
        sparse.write_all(&[1u8; 4096]).unwrap();
        sparse.seek(SeekFrom::Start(1 << 20)).unwrap();
        sparse.write_all(&[2u8; 4096]).unwrap();
        drop(sparse);
        rustix::fs::setxattr(
            root.join("dir/file"),
            "user.hull-test",
            b"a value",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }

    fn changed(name: &str, change: impl FnOnce(&Path), paths: &[&str]) {
        let base = tempfile::tempdir().unwrap();
        fixture(base.path());
        let other = tempfile::tempdir().unwrap();
        fixture(other.path());
        let a = tree_manifest(base.path());
        assert_eq!(
            a.diff(&tree_manifest(other.path())),
            Vec::<String>::new(),
            "two fixtures differ before any change"
        );
        change(other.path());
        let b = tree_manifest(other.path());
        let diff = a.diff(&b);
        assert!(!diff.is_empty(), "{name}: not seen");
        assert_ne!(a.digest(), b.digest(), "{name}: same digest");
        let named: Vec<&str> = diff
            .iter()
            .map(|d| d.split_once(':').map_or(d.as_str(), |(p, _)| p))
            .collect();
        assert_eq!(named, paths, "{name}: {diff:?}");
    }

    #[test]
    fn a_change_of_each_property_is_named_by_its_path() {
        changed(
            "content",
            |r| fs::write(r.join("dir/file"), b"other content").unwrap(),
            &["dir/file"],
        );
        changed(
            "mode",
            |r| fs::set_permissions(r.join("dir/sub"), fs::Permissions::from_mode(0o700)).unwrap(),
            &["dir/sub"],
        );
        changed(
            "xattr",
            |r| {
                rustix::fs::setxattr(
                    r.join("dir/file"),
                    "user.hull-test",
                    b"another value",
                    rustix::fs::XattrFlags::empty(),
                )
                .unwrap()
            },
            &["dir/file"],
        );
        changed(
            "symlink target",
            |r| {
                fs::remove_file(r.join("symlink")).unwrap();
                std::os::unix::fs::symlink("dir/linked", r.join("symlink")).unwrap();
            },
            &["symlink"],
        );
        changed(
            "a new directory",
            |r| fs::create_dir(r.join("dir/sub/new")).unwrap(),
            &["dir/sub/new"],
        );
        // The same bytes, with the hole written as zeros.
        changed(
            "sparse layout",
            |r| {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .open(r.join("sparse"))
                    .unwrap();
                f.seek(SeekFrom::Start(4096)).unwrap();
                f.write_all(&vec![0u8; (1 << 20) - 4096]).unwrap();
                f.sync_all().unwrap();
            },
            &["sparse"],
        );
        // The same bytes under both names, but two inodes.
        changed(
            "hard link",
            |r| {
                fs::remove_file(r.join("other-name")).unwrap();
                fs::write(r.join("other-name"), b"two names").unwrap();
            },
            // Both names lose their link.
            &["dir/linked", "other-name"],
        );
        if crate::require_root() {
            changed(
                "owner",
                |r| std::os::unix::fs::lchown(r.join("symlink"), Some(1000), Some(1000)).unwrap(),
                &["symlink"],
            );
        }
    }
}
