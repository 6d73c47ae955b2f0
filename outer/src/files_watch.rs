//! `Files(Watch)`: inotify events under a directory of the inner, one
//! `FileEvent` each, until the client closes the connection (the HTTP
//! API's `fs/watch` relays them to a WebSocket).
//!
//! Every watch of every client shares one inotify instance, held by one
//! thread of hulld's ([`Hub`]): inotify instances are counted per user
//! (`fs.inotify.max_user_instances`, 128 by default), and one each would
//! let 128 clients take every instance root has on the VM. The thread
//! reads the events and hands each to the clients watching its directory
//! (by watch descriptor: a directory two clients watch has one), never
//! waiting for a client: each has an outbox of its own, bounded, past
//! which events are dropped and `FileEvent::Overflow` says so. A client
//! that reads slowly holds up its connection's writer, and so its outbox
//! fills: that is its backpressure, and nobody else's.
//!
//! Directories are found as every files route finds them (under the
//! inner's root, never through a link out of it) and watched through their
//! fd's own /proc/self/fd entry, so the watch is on exactly the directory
//! resolved. A watch remembers its directory by the path it was found at;
//! a directory made later under a recursive watch is looked up the same
//! way before it is watched.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{SinkExt, StreamExt};
use hull_proto::{DaemonMsg, FileChange, FileEvent};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::io::AsyncRead;
use tokio::sync::Notify;

use hull_inner::files::{InnerPath, Root};

use crate::files::After;
use crate::server::Reader;

/// Directories one watch may cover; past it the client is told, and the
/// rest goes unwatched. Each costs the kernel's inotify memory, not fds.
pub const MAX_WATCHED_DIRS: usize = 8192;

/// Directories watched for all clients together (a directory several
/// watch counts once), and no more than half of root's
/// `fs.inotify.max_user_watches` (about 10,000 on a 1 GiB VM): watches
/// are counted per user too, and each pins kernel memory.
pub const MAX_TOTAL_WATCHED_DIRS: usize = 16384;

/// Events queued for a slow client, and their bytes; past either,
/// events are dropped and `FileEvent::Overflow` says so.
const QUEUE: usize = 1024;
const QUEUE_BYTES: usize = 64 * 1024;

const EVENTS: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::ONLYDIR);

/// The one inotify instance, and who watches what through it.
struct Hub {
    inotify: OwnedFd,
    /// Directories it watches at most: [`MAX_TOTAL_WATCHED_DIRS`], or half
    /// the system's limit when that is lower.
    max_total: usize,
    state: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    clients: HashMap<u64, Client>,
    /// Each watch descriptor's clients.
    watchers: HashMap<i32, Vec<u64>>,
    next_id: u64,
}

/// One client's watch.
struct Client {
    root: Arc<Root>,
    recursive: bool,
    /// Its watch descriptors and the paths it found them at.
    paths: HashMap<i32, String>,
    outbox: Arc<Outbox>,
    /// Whether it was told that a cap left directories unwatched.
    told_full: bool,
}

/// The hub, started at the first watch; a hub whose reader failed is
/// replaced at the next.
static HUB: Mutex<Option<Arc<Hub>>> = Mutex::new(None);

impl Hub {
    fn get() -> io::Result<Arc<Hub>> {
        let mut hub = HUB.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hub) = hub.as_ref() {
            return Ok(hub.clone());
        }
        let system = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok());
        let started = Arc::new(Hub {
            inotify: inotify::init(CreateFlags::CLOEXEC)?,
            max_total: system.map_or(MAX_TOTAL_WATCHED_DIRS, |n| {
                (n / 2).clamp(1, MAX_TOTAL_WATCHED_DIRS)
            }),
            state: Mutex::new(HubState::default()),
        });
        let reader = started.clone();
        std::thread::Builder::new()
            .name("hull-fs-watch".into())
            .spawn(move || reader.read_events())?;
        *hub = Some(started.clone());
        Ok(started)
    }

    fn state(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `dir` for client `id`, under both caps; `Ok(false)` when
    /// the client is gone or a cap left it unwatched.
    fn watch(&self, id: u64, dir: &OwnedFd, shown: &str) -> io::Result<bool> {
        let mut state = self.state();
        let total = state.watchers.len();
        let Some(client) = state.clients.get_mut(&id) else {
            return Ok(false);
        };
        let full = if client.paths.len() >= MAX_WATCHED_DIRS {
            Some(format!("a watch covers at most {MAX_WATCHED_DIRS} directories: {shown} and others are not watched"))
        } else if total >= self.max_total {
            Some(format!(
                "hulld watches at most {} directories for all clients together: {shown} and others are not watched",
                self.max_total
            ))
        } else {
            None
        };
        if let Some(message) = full {
            if !std::mem::replace(&mut client.told_full, true) {
                client.outbox.push(FileEvent::Incomplete { message });
            }
            return Ok(false);
        }
        let own = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let wd = inotify::add_watch(&self.inotify, own, EVENTS)?;
        // The same directory again (moved within the tree): a new path,
        // the same descriptor.
        if client.paths.insert(wd, shown.to_string()).is_none() {
            state.watchers.entry(wd).or_default().push(id);
        }
        Ok(true)
    }

    /// Watches `dir` (found at `shown`) and, when the client's watch is
    /// recursive, the directories under it, one name at a time.
    fn watch_tree(
        &self,
        id: u64,
        root: &Root,
        recursive: bool,
        dir: OwnedFd,
        shown: String,
        depth: usize,
    ) -> io::Result<()> {
        if !self.watch(id, &dir, &shown)? || !recursive || depth >= hull_inner::files::MAX_DEPTH {
            return Ok(());
        }
        for (name, sub) in root.subdirs(&dir)? {
            let shown = format!("{}/{}", shown.trim_end_matches('/'), name.to_string_lossy());
            self.watch_tree(id, root, recursive, sub, shown, depth + 1)?;
        }
        Ok(())
    }

    /// Forgets client `id`; a directory no other client watches is no
    /// longer watched.
    fn forget(&self, id: u64) {
        let mut state = self.state();
        let Some(client) = state.clients.remove(&id) else {
            return;
        };
        for wd in client.paths.keys() {
            let Some(ids) = state.watchers.get_mut(wd) else {
                continue;
            };
            ids.retain(|&other| other != id);
            if ids.is_empty() {
                state.watchers.remove(wd);
                // EINVAL: the kernel dropped it already (its directory
                // went); its IN_IGNORED finds nobody.
                let _ = inotify::remove_watch(&self.inotify, *wd);
            }
        }
    }

    /// The reader thread: every event to the clients watching its
    /// directory, for as long as hulld runs.
    fn read_events(self: Arc<Self>) {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
        let mut reader = inotify::Reader::new(&self.inotify, &mut buf);
        loop {
            let (wd, flags, name) = match reader.next() {
                Ok(event) => (
                    event.wd(),
                    event.events(),
                    event
                        .file_name()
                        .map(|n| OsStr::from_bytes(n.to_bytes()).to_os_string()),
                ),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the file watches' inotify events failed; every watch ends");
                    self.fail_all(&format!("the watch failed: {e}"));
                    return;
                }
            };
            for (id, root, path) in self.dispatch(wd, flags, name.as_deref()) {
                // A directory made (or moved in) under a recursive watch.
                if let Ok(inner) = InnerPath::new(&path, None) {
                    if let Ok(fd) = root.open_dir(&inner) {
                        let _ = self.watch_tree(id, &root, true, fd, path, 0);
                    }
                }
            }
        }
    }

    /// Hands one event to its clients; the directories to watch next, for
    /// recursive clients, with the client and its root.
    fn dispatch(
        &self,
        wd: i32,
        flags: ReadFlags,
        name: Option<&OsStr>,
    ) -> Vec<(u64, Arc<Root>, String)> {
        let mut state = self.state();
        let mut more = Vec::new();
        if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
            for client in state.clients.values() {
                client.outbox.push(FileEvent::Overflow);
            }
            return more;
        }
        let Some(ids) = state.watchers.get(&wd).cloned() else {
            return more;
        };
        if flags.contains(ReadFlags::IGNORED) {
            // The directory went (or its mount): gone for every client.
            state.watchers.remove(&wd);
            for id in ids {
                if let Some(client) = state.clients.get_mut(&id) {
                    client.paths.remove(&wd);
                    if client.paths.is_empty() {
                        client.outbox.end(FileEvent::Gone);
                    }
                }
            }
            return more;
        }
        let Some(change) = change(flags) else {
            return more;
        };
        let is_dir = flags.contains(ReadFlags::ISDIR);
        for id in ids {
            let Some(client) = state.clients.get(&id) else {
                continue;
            };
            let Some(dir) = client.paths.get(&wd) else {
                continue;
            };
            let path = match name {
                Some(name) => format!("{}/{}", dir.trim_end_matches('/'), name.to_string_lossy()),
                None => dir.clone(),
            };
            if is_dir
                && client.recursive
                && matches!(change, FileChange::Create | FileChange::MovedTo)
            {
                more.push((id, client.root.clone(), path.clone()));
            }
            client.outbox.push(FileEvent::Change {
                change,
                path,
                is_dir,
            });
        }
        more
    }

    /// The reader failed: every client is told, and the next watch starts
    /// a new hub.
    fn fail_all(self: &Arc<Self>, message: &str) {
        {
            let mut hub = HUB.lock().unwrap_or_else(|e| e.into_inner());
            if hub.as_ref().is_some_and(|h| Arc::ptr_eq(h, self)) {
                *hub = None;
            }
        }
        let state = self.state();
        for client in state.clients.values() {
            client.outbox.end(FileEvent::Failed {
                message: message.to_string(),
            });
        }
    }
}

/// What the client is told an event was.
fn change(flags: ReadFlags) -> Option<FileChange> {
    [
        (ReadFlags::CREATE, FileChange::Create),
        (ReadFlags::DELETE, FileChange::Delete),
        (ReadFlags::MODIFY, FileChange::Modify),
        (ReadFlags::CLOSE_WRITE, FileChange::CloseWrite),
        (ReadFlags::ATTRIB, FileChange::Attrib),
        (ReadFlags::MOVED_FROM, FileChange::MovedFrom),
        (ReadFlags::MOVED_TO, FileChange::MovedTo),
        (ReadFlags::DELETE_SELF, FileChange::DeleteSelf),
    ]
    .into_iter()
    .find(|(flag, _)| flags.contains(*flag))
    .map(|(_, change)| change)
}

/// The bytes an event holds in an outbox, for its bound.
fn event_size(event: &FileEvent) -> usize {
    let text = match event {
        FileEvent::Change { path, .. } => path.len(),
        FileEvent::Incomplete { message } | FileEvent::Failed { message } => message.len(),
        FileEvent::Overflow | FileEvent::Gone => 0,
    };
    text + 16
}

/// The events waiting for one client: filled by the hub's thread, which
/// never waits, and emptied by the client's connection task.
struct Outbox {
    state: Mutex<OutboxState>,
    ready: Notify,
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<FileEvent>,
    bytes: usize,
    /// Events were dropped since the last one queued (and `overflow`
    /// queued for them).
    overflowed: bool,
    /// The last message is queued: the watch is over.
    ended: bool,
}

impl Outbox {
    fn new() -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState::default()),
            ready: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, event: FileEvent) {
        {
            let mut s = self.lock();
            if s.ended {
                return;
            }
            let size = event_size(&event);
            if s.queue.len() >= QUEUE || s.bytes + size > QUEUE_BYTES {
                if s.overflowed {
                    return;
                }
                // Past the bound by this one short message.
                s.overflowed = true;
                s.queue.push_back(FileEvent::Overflow);
            } else {
                s.overflowed = false;
                s.bytes += size;
                s.queue.push_back(event);
            }
        }
        self.ready.notify_one();
    }

    /// Queues the last message (past the bound: it is one).
    fn end(&self, last: FileEvent) {
        {
            let mut s = self.lock();
            if s.ended {
                return;
            }
            s.ended = true;
            s.queue.push_back(last);
        }
        self.ready.notify_one();
    }

    /// What is queued, and whether the watch is over.
    fn take(&self) -> (VecDeque<FileEvent>, bool) {
        let mut s = self.lock();
        s.bytes = 0;
        (std::mem::take(&mut s.queue), s.ended)
    }
}

/// One client's watch, forgotten by the hub when dropped.
pub struct Watch {
    hub: Arc<Hub>,
    id: u64,
    outbox: Arc<Outbox>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // A recursive watch may hold thousands of descriptors: removed on
        // a blocking thread when there is a runtime to ask.
        let (hub, id) = (self.hub.clone(), self.id);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || hub.forget(id))),
            Err(_) => hub.forget(id),
        }
    }
}

/// Sets up the watch of `path` (and, with `recursive`, every directory
/// under it), or says why it cannot. Blocks: it walks the tree.
pub fn begin(root: Root, path: &InnerPath, recursive: bool) -> io::Result<Watch> {
    let hub = Hub::get()?;
    let root = Arc::new(root);
    let outbox = Outbox::new();
    let id = {
        let mut state = hub.state();
        let id = state.next_id;
        state.next_id += 1;
        state.clients.insert(
            id,
            Client {
                root: root.clone(),
                recursive,
                paths: HashMap::new(),
                outbox: outbox.clone(),
                told_full: false,
            },
        );
        id
    };
    // From here the hub forgets the client when this is dropped, an error
    // below included.
    let watch = Watch { hub, id, outbox };
    let dir = root.open_dir(path)?;
    watch
        .hub
        .watch_tree(id, &root, recursive, dir, path.shown.clone(), 0)?;
    Ok(watch)
}

/// Sends the watch's events to the client until the watch ends or the
/// client leaves: closes its connection or sends anything, since a
/// watch's connection serves nothing else.
pub async fn relay<S, W>(
    watch: Watch,
    reader: &mut Reader<S>,
    writer: &mut W,
) -> std::io::Result<After>
where
    S: AsyncRead,
    W: futures::Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    loop {
        let (events, ended) = watch.outbox.take();
        let idle = events.is_empty();
        for event in events {
            writer.send(DaemonMsg::FileEvent(event)).await?;
        }
        if ended {
            return Ok(After::Gone);
        }
        if !idle {
            continue;
        }
        tokio::select! {
            () = watch.outbox.ready.notified() => {}
            // Cancelling a frame half read loses nothing: the client is
            // done either way.
            _ = reader.next() => return Ok(After::Gone),
        }
    }
}

/// Number of inotify instances the watches hold (at most one).
#[cfg(test)]
fn instances() -> usize {
    usize::from(HUB.lock().unwrap_or_else(|e| e.into_inner()).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::OFlags;

    fn instances_in_proc() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy() == "anon_inode:inotify")
            .count()
    }

    /// A root for a plain directory of this machine (tests only: the
    /// owner is whoever runs them).
    fn root_at(dir: &std::path::Path) -> Root {
        let fd = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        Root::new(
            fd,
            hull_inner::files::Owner {
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
            },
        )
    }

    fn next_message(watch: &Watch) -> FileEvent {
        for _ in 0..200 {
            let (mut messages, _) = watch.outbox.take();
            if let Some(first) = messages.pop_front() {
                return first;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no event within 2 s");
    }

    #[test]
    fn many_watches_share_one_instance_and_each_gets_its_events() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let before = instances_in_proc();
        let path = InnerPath::new("/", None).unwrap();
        let watches: Vec<Watch> = (0..200)
            .map(|_| begin(root_at(dir.path()), &path, true).unwrap())
            .collect();
        assert_eq!(instances(), 1);
        assert!(
            instances_in_proc() <= before + 1,
            "200 watches hold {} inotify instances",
            instances_in_proc() - before
        );
        std::fs::write(dir.path().join("sub/a"), b"x").unwrap();
        for watch in [&watches[0], &watches[199]] {
            assert_eq!(
                next_message(watch),
                FileEvent::Change {
                    change: FileChange::Create,
                    path: "/sub/a".into(),
                    is_dir: false
                }
            );
        }
        // One client leaving leaves the others' watch of the same
        // directory in place.
        let kept = watches.into_iter().next_back().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let _ = kept.outbox.take();
        std::fs::write(dir.path().join("b"), b"y").unwrap();
        let message = next_message(&kept);
        assert!(
            matches!(&message, FileEvent::Change { path, .. } if path == "/b"),
            "{message:?}"
        );
    }

    #[test]
    fn a_slow_client_overflows_alone_and_is_told() {
        let outbox = Outbox::new();
        let event = |path: &str| FileEvent::Change {
            change: FileChange::Modify,
            path: path.into(),
            is_dir: false,
        };
        for i in 0..QUEUE * 2 {
            outbox.push(event(&format!("/{i}")));
        }
        let (queue, ended) = outbox.take();
        assert!(!ended);
        assert_eq!(queue.len(), QUEUE + 1);
        assert_eq!(queue.back().unwrap(), &FileEvent::Overflow);
        outbox.push(event("/after"));
        outbox.end(FileEvent::Gone);
        outbox.push(event("/too late"));
        let (queue, ended) = outbox.take();
        assert!(ended);
        assert_eq!(Vec::from(queue), [event("/after"), FileEvent::Gone]);
    }
}
