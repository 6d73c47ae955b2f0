//! The local chunk index: the names of chunks this machine knows are in
//! the remote, one per line, appended only after the object's upload (or
//! its HEAD) succeeded. It makes a push cheap to resume after a crash or
//! a kill -9: the stream is sent again, and every chunk the index names
//! is neither asked about nor uploaded.
//!
//! A line is written after the store said the object is there, so the
//! index can miss chunks (a crash lost its tail: they are asked about
//! again) but never names one that was not uploaded. A torn last line is
//! not 64 hex digits and is skipped. The first line names the remote and
//! key the index is for; an index of another remote is started afresh.
//! The header also holds the garbage collector's generation, bumped by
//! every collection that deleted chunks: a push that sees a new one
//! starts the index afresh ([`ChunkIndex::rebase`]).

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{RemoteError, Result};

#[derive(Debug)]
struct Inner {
    header: String,
    known: HashSet<String>,
    file: fs::File,
}

#[derive(Debug, Clone)]
pub(crate) struct ChunkIndex {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
}

fn is_name(line: &str) -> bool {
    line.len() == 64 && line.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ChunkIndex {
    /// Opens (or starts) the index at `path` for the remote `header`
    /// describes. Blocking.
    pub(crate) fn open(path: &Path, header: &str) -> Result<ChunkIndex> {
        let err = |what| {
            move |source| RemoteError::Index {
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(err("create the directory of"))?;
        }
        let mut known = HashSet::new();
        let mut fresh = true;
        match fs::File::open(path) {
            Ok(f) => {
                let mut lines = BufReader::new(f).lines();
                if let Some(first) = lines.next() {
                    if first.map_err(err("read"))? == header {
                        fresh = false;
                        for line in lines {
                            let line = line.map_err(err("read"))?;
                            if is_name(&line) {
                                known.insert(line);
                            }
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("open")(e)),
        }
        let file = if fresh {
            let mut f = fs::File::create(path).map_err(err("create"))?;
            writeln!(f, "{header}").map_err(err("write"))?;
            f
        } else {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(err("open"))?;
            // A torn last line gets its newline, so the next name starts
            // a line of its own.
            let torn = fs::read(path)
                .map_err(err("read"))?
                .last()
                .is_some_and(|b| *b != b'\n');
            if torn {
                f.write_all(b"\n").map_err(err("write"))?;
            }
            f
        };
        Ok(ChunkIndex {
            path: path.to_path_buf(),
            inner: Arc::new(Mutex::new(Inner {
                header: header.to_string(),
                known,
                file,
            })),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each write is one line; a panic mid-way leaves at worst a torn
        // line, which opening skips.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the index afresh under `header` unless it has that header
    /// already. Blocking.
    pub(crate) fn rebase(&self, header: &str) -> Result<()> {
        let mut inner = self.lock();
        if inner.header == header {
            return Ok(());
        }
        let mut file = fs::File::create(&self.path).map_err(|source| RemoteError::Index {
            what: "create",
            path: self.path.clone(),
            source,
        })?;
        writeln!(file, "{header}").map_err(|source| RemoteError::Index {
            what: "write",
            path: self.path.clone(),
            source,
        })?;
        *inner = Inner {
            header: header.to_string(),
            known: HashSet::new(),
            file,
        };
        Ok(())
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.lock().known.contains(name)
    }

    /// Records that `name` is in the remote. Blocking (one short write).
    pub(crate) fn insert(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        if inner.known.contains(name) {
            return Ok(());
        }
        // One write of the whole line: a kill tears at most this line.
        inner
            .file
            .write_all(format!("{name}\n").as_bytes())
            .map_err(|source| RemoteError::Index {
                what: "append to",
                path: self.path.clone(),
                source,
            })?;
        inner.known.insert(name.to_string());
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().known.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_survives_a_reopen_a_torn_line_and_another_remote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let index = ChunkIndex::open(&path, "remote one").unwrap();
        index.insert(&a).unwrap();
        index.insert(&b).unwrap();
        drop(index);
        // A kill in the middle of a write.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"cccc").unwrap();
        let index = ChunkIndex::open(&path, "remote one").unwrap();
        assert_eq!(index.len(), 2);
        assert!(index.contains(&a) && index.contains(&b));
        let c = "c".repeat(64);
        index.insert(&c).unwrap();
        drop(index);
        let index = ChunkIndex::open(&path, "remote one").unwrap();
        assert!(index.contains(&c), "a name after a torn line is kept");
        let index = ChunkIndex::open(&path, "remote two").unwrap();
        assert_eq!(index.len(), 0);
        assert!(!index.contains(&a));
    }
}
