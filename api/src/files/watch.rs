//! `GET .../fs/watch?path=&recursive=`, a hull extension: inotify events
//! under a directory of the sandbox, one JSON text message each, until the
//! client closes.
//!
//! Directories are found as every files route finds them (under the
//! inner's root, never through a link out of it) and watched through their
//! fd's own /proc/self/fd entry, so the watch is on exactly the directory
//! resolved. A watch remembers its directory by the path it was found at;
//! a directory made later under a recursive watch is looked up the same
//! way before it is watched.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use futures::{SinkExt, StreamExt};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{AtFlags, FileType, OFlags};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::ops::{InnerPath, Root};

/// Directories one watch may cover; past it the client is told, and the
/// rest goes unwatched. Each costs the kernel's inotify memory, not fds.
pub const MAX_WATCHED_DIRS: usize = 8192;

/// Events queued for a slow client; past it events are dropped and an
/// `overflow` message says so.
const QUEUE: usize = 1024;

/// How often the reader looks whether its client has gone.
const CLIENT_CHECK_MS: u16 = 200;

const EVENTS: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::ONLYDIR);

/// The directories watched: inotify's watch descriptors to the paths they
/// were found at.
struct Watches {
    inotify: OwnedFd,
    paths: HashMap<i32, String>,
    recursive: bool,
}

/// Sets up the watch of `path` (and, with `recursive`, every directory
/// under it), or says why it cannot.
pub fn begin(root: Root, path: &InnerPath, recursive: bool) -> io::Result<Watcher> {
    let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
    let mut watches = Watches {
        inotify,
        paths: HashMap::new(),
        recursive,
    };
    let dir = root.open_dir(path)?;
    let mut notes = Vec::new();
    watches.add(&root, dir, path.shown.clone(), 0, &mut notes)?;
    Ok(Watcher {
        root,
        watches,
        notes,
    })
}

pub struct Watcher {
    root: Root,
    watches: Watches,
    /// Messages for the client from setting up (a tree too large).
    notes: Vec<serde_json::Value>,
}

impl Watches {
    /// Watches `dir` (found at `shown`) and, when recursive, its
    /// subdirectories, one name at a time.
    fn add(
        &mut self,
        root: &Root,
        dir: OwnedFd,
        shown: String,
        depth: usize,
        notes: &mut Vec<serde_json::Value>,
    ) -> io::Result<()> {
        if self.paths.len() >= MAX_WATCHED_DIRS {
            if notes.is_empty() {
                notes.push(json!({
                    "type": "error",
                    "message": format!("more than {MAX_WATCHED_DIRS} directories: {shown} and others are not watched"),
                }));
            }
            return Ok(());
        }
        let own = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let wd = inotify::add_watch(&self.inotify, own, EVENTS)?;
        self.paths.insert(wd, shown.clone());
        if !self.recursive || depth >= super::ops::MAX_DEPTH {
            return Ok(());
        }
        for (name, sub) in root.subdirs(&dir)? {
            let shown = format!("{}/{}", shown.trim_end_matches('/'), name.to_string_lossy());
            self.add(root, sub, shown, depth + 1, notes)?;
        }
        Ok(())
    }
}

impl Watcher {
    /// Reads events until the client is gone (`tx` closed) or the watched
    /// directory is.
    pub fn run(mut self, tx: mpsc::Sender<String>) {
        for note in self.notes.drain(..) {
            if tx.blocking_send(note.to_string()).is_err() {
                return;
            }
        }
        let mut buf = [MaybeUninit::<u8>::uninit(); 64 * 1024];
        let mut dropped = false;
        loop {
            {
                use std::os::fd::AsFd;
                let mut fds = [nix::poll::PollFd::new(
                    self.watches.inotify.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, CLIENT_CHECK_MS);
            }
            if tx.is_closed() {
                return;
            }
            let mut events = Vec::new();
            let mut reader = inotify::Reader::new(&self.watches.inotify, &mut buf);
            loop {
                match reader.next() {
                    Ok(event) => events.push((
                        event.wd(),
                        event.events(),
                        event
                            .file_name()
                            .map(|n| OsStr::from_bytes(n.to_bytes()).to_os_string()),
                    )),
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(e) => {
                        let _ = tx.blocking_send(
                            json!({"type": "error", "message": format!("the watch failed: {e}")})
                                .to_string(),
                        );
                        return;
                    }
                }
                if reader.is_buffer_empty() {
                    break;
                }
            }
            for (wd, flags, name) in events {
                let Some(message) = self.describe(wd, flags, name.as_deref()) else {
                    continue;
                };
                match tx.try_send(message.to_string()) {
                    Ok(()) => dropped = false,
                    Err(mpsc::error::TrySendError::Full(_)) if !dropped => {
                        dropped = true;
                        if tx
                            .blocking_send(json!({"type": "overflow"}).to_string())
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
                if self.watches.paths.is_empty() {
                    let _ = tx.blocking_send(json!({"type": "gone"}).to_string());
                    return;
                }
            }
        }
    }

    /// One event as the client gets it; a new directory under a recursive
    /// watch is watched too.
    fn describe(
        &mut self,
        wd: i32,
        flags: ReadFlags,
        name: Option<&OsStr>,
    ) -> Option<serde_json::Value> {
        if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
            return Some(json!({"type": "overflow"}));
        }
        if flags.contains(ReadFlags::IGNORED) {
            self.watches.paths.remove(&wd);
            return None;
        }
        let dir = self.watches.paths.get(&wd)?.clone();
        let path = match name {
            Some(name) => format!("{}/{}", dir.trim_end_matches('/'), name.to_string_lossy()),
            None => dir,
        };
        let is_dir = flags.contains(ReadFlags::ISDIR);
        let kind = [
            (ReadFlags::CREATE, "create"),
            (ReadFlags::DELETE, "delete"),
            (ReadFlags::MODIFY, "modify"),
            (ReadFlags::CLOSE_WRITE, "close_write"),
            (ReadFlags::ATTRIB, "attrib"),
            (ReadFlags::MOVED_FROM, "moved_from"),
            (ReadFlags::MOVED_TO, "moved_to"),
            (ReadFlags::DELETE_SELF, "delete_self"),
        ]
        .into_iter()
        .find(|(flag, _)| flags.contains(*flag))
        .map(|(_, kind)| kind)?;
        if is_dir && self.watches.recursive && matches!(kind, "create" | "moved_to") {
            if let Ok(inner) = InnerPath::new(&path, None) {
                if let Ok(fd) = self.root.open_dir(&inner) {
                    let mut notes = Vec::new();
                    let _ = self
                        .watches
                        .add(&self.root, fd, path.clone(), 0, &mut notes);
                }
            }
        }
        Some(json!({"type": kind, "path": path, "isDir": is_dir}))
    }
}

impl Root {
    /// The subdirectories of `dir`, each an `O_PATH` fd found one name at
    /// a time (never through a symlink or into another mount).
    fn subdirs(&self, dir: &OwnedFd) -> io::Result<Vec<(std::ffi::OsString, OwnedFd)>> {
        let real = hull_inner::layer::reopen(dir)?;
        let mut out = Vec::new();
        for name in super::ops::names(&real)? {
            let Ok(st) = rustix::fs::statat(&real, &name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                continue;
            }
            if let Ok(fd) = super::ops::open_below(&real, &name, OFlags::PATH | OFlags::DIRECTORY) {
                out.push((name, fd));
            }
        }
        Ok(out)
    }
}

/// Carries the events to the WebSocket until either side ends.
pub async fn relay(mut ws: crate::ws::Ws, mut events: mpsc::Receiver<String>) {
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(text) => {
                    if ws.send(Message::text(text)).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = ws.close(None).await;
                    return;
                }
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

pub fn channel() -> (mpsc::Sender<String>, mpsc::Receiver<String>) {
    mpsc::channel(QUEUE)
}
