//! The inner's files as hulld reaches them (the protocol's `Files`
//! requests, the HTTP API's files routes), on blocking threads: every path resolved under
//! the inner's root by fd, every change made with `*at` calls on
//! directories found that way, so no symlink, `..` or /proc link the
//! inner plants reaches the root namespace.
//!
//! hulld is root here, outside the inner's seccomp filter and device
//! cgroup, so the files API is confined to the user's layer (the inner's
//! `/` filesystem): a path that leads into another mount (/proc, /sys,
//! /dev, a bind mount) is refused, and so is a name that is itself a mount
//! point, wherever a name is removed, replaced or made (hulld's mount
//! namespace is not the inner's, and there the kernel lets an unlink or a
//! rename take a mount point away from the inner). Only regular files are
//! opened, never a device node the inner made.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use hull_proto::{FileEntry, FileKind};

use crate::layer::{refuse_mount_point, Layer};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};

/// The host ids of the inner's root user, given to new files and
/// directories, so they belong to root as the inner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Directory levels a recursive delete, copy or chmod descends; each
/// holds an fd, so a tree the inner made a million levels deep costs a
/// clear error, not hulld's fds.
pub const MAX_DEPTH: usize = 256;

/// Bytes of an upload written before their writeback is started.
const WRITEBACK_WINDOW: u64 = 8 << 20;

/// One name below a directory already found: never a symlink, never
/// another mount.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_XDEV)
    .union(ResolveFlags::NO_MAGICLINKS);

/// A path in the inner as the client named it (`shown`, absolute) and
/// relative to the inner's root (`rel`).
#[derive(Debug, Clone)]
pub struct InnerPath {
    pub shown: String,
    rel: PathBuf,
}

impl InnerPath {
    /// `path`, made absolute against `working_dir` (the inner's `/` when
    /// absent). Lexical only: the kernel resolves `..` and symlinks, under
    /// the inner's root.
    pub fn new(path: &str, working_dir: Option<&str>) -> Result<InnerPath, String> {
        if path.is_empty() {
            return Err("the path is empty".into());
        }
        if path.contains('\0') || working_dir.is_some_and(|w| w.contains('\0')) {
            return Err("the path has a NUL byte".into());
        }
        let shown = if path.starts_with('/') {
            path.to_string()
        } else {
            let base = working_dir.unwrap_or("/").trim_end_matches('/');
            let base = if base.starts_with('/') {
                base.to_string()
            } else {
                format!("/{base}")
            };
            format!("{base}/{path}")
        };
        let rel = PathBuf::from(shown.trim_start_matches('/'));
        Ok(InnerPath { shown, rel })
    }

    /// The directory the path is in and its last name, for the calls
    /// that make, remove or rename that name.
    fn split(&self) -> io::Result<(PathBuf, OsString)> {
        match self.rel.components().next_back() {
            Some(Component::Normal(name)) => {
                let parent = self.rel.parent().unwrap_or(Path::new("")).to_path_buf();
                Ok((parent, name.to_os_string()))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path names no entry of a directory (it is / or ends in ..)",
            )),
        }
    }

    fn join(&self, name: &OsStr) -> String {
        let base = self.shown.trim_end_matches('/');
        format!("{base}/{}", name.to_string_lossy())
    }
}

pub use hull_proto::files::Failure;

/// The running inner's root, and who owns what is made in it.
pub struct Root {
    layer: Layer,
    owner: Owner,
}

impl Root {
    pub fn new(dir: OwnedFd, owner: Owner) -> Root {
        Root {
            layer: Layer::from_fd(dir),
            owner,
        }
    }

    fn open(&self, path: &InnerPath, flags: OFlags) -> io::Result<OwnedFd> {
        self.layer.open_in_layer(&path.rel, flags)
    }

    /// The directory `path` is in (made first, as mkdir -p, with `make`)
    /// and its last name, which is refused (EXDEV) if it is a mount point.
    fn parent(&self, path: &InnerPath, make: bool) -> io::Result<(OwnedFd, OsString)> {
        let (parent, name) = path.split()?;
        let dir = if make {
            self.layer.make_dir_in_layer(&parent, 0o755)?
        } else {
            self.layer
                .open_in_layer(&parent, OFlags::PATH | OFlags::DIRECTORY)?
        };
        refuse_mount_point(&dir, &name)?;
        Ok((dir, name))
    }

    /// The directory `path`, as an `O_PATH` fd.
    pub fn open_dir(&self, path: &InnerPath) -> io::Result<OwnedFd> {
        self.open(path, OFlags::PATH | OFlags::DIRECTORY)
    }

    pub fn stat(&self, path: &InnerPath) -> io::Result<FileEntry> {
        let fd = self.open(path, OFlags::PATH)?;
        let name = match path.rel.file_name() {
            Some(name) => name.to_string_lossy().into_owned(),
            None => "/".to_string(),
        };
        let st = rustix::fs::fstat(&fd)?;
        // An O_PATH fd of a symlink reads its target with an empty name.
        let target = link_target(&fd, c"", &st);
        Ok(entry(name, path.shown.clone(), &st, target))
    }

    /// A directory's entries sorted by name, or a file's own entry.
    pub fn list(&self, path: &InnerPath) -> io::Result<Vec<FileEntry>> {
        let fd = self.open(path, OFlags::PATH)?;
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Ok(vec![self.stat(path)?]);
        }
        let dir = crate::layer::reopen(&fd)?;
        let mut entries = Vec::new();
        for name in names(&dir)? {
            let st = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
            let target = link_target(&dir, &name, &st);
            entries.push(entry(
                name.to_string_lossy().into_owned(),
                path.join(&name),
                &st,
                target,
            ));
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// A regular file opened for reading, and its size.
    pub fn open_read(&self, path: &InnerPath) -> io::Result<(File, u64)> {
        let fd = self.open(path, OFlags::PATH)?;
        let file = reopen_regular(&fd, OFlags::RDONLY)?;
        let size = file.metadata()?.len();
        Ok((file, size))
    }

    /// Starts a write of `path`: its content goes to a temporary name
    /// beside it until [`Upload::finish`].
    pub fn upload(&self, path: &InnerPath, make_parents: bool) -> io::Result<Upload> {
        let acting = ActingAs::owner(self.owner)?;
        let (dir, name) = self.parent(path, make_parents)?;
        let mut upload = Upload::begin(dir, name)?;
        upload.acting = Some(acting);
        Ok(upload)
    }

    /// Makes the directory `path` and its missing parents with `mode`, as
    /// mkdir -p; its entry.
    pub fn make_dir(&self, path: &InnerPath, mode: u32) -> io::Result<FileEntry> {
        let _acting = ActingAs::owner(self.owner)?;
        self.layer.make_dir_in_layer(&path.rel, mode)?;
        self.stat(path)
    }

    /// Makes `path` a symlink to `target`, its text as given (never
    /// resolved), replacing a file or symlink there whole: made under a
    /// temporary name and renamed into place. Its entry.
    pub fn symlink(&self, path: &InnerPath, target: &str) -> io::Result<FileEntry> {
        let _acting = ActingAs::owner(self.owner)?;
        let (dir, name) = self.parent(path, false)?;
        if let Ok(st) = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
            if is_dir(&st) {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
        }
        let temp = temp_name("link")?;
        rustix::fs::symlinkat(target, &dir, &temp)?;
        if let Err(e) = rustix::fs::renameat(&dir, &temp, &dir, &name) {
            let _ = rustix::fs::unlinkat(&dir, &temp, AtFlags::empty());
            return Err(e.into());
        }
        let st = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        let target = link_target(&dir, &name, &st);
        Ok(entry(
            name.to_string_lossy().into_owned(),
            path.shown.clone(),
            &st,
            target,
        ))
    }

    /// Removes `path` (a directory and all in it with `recursive`);
    /// returns the entries removed.
    pub fn delete(&self, path: &InnerPath, recursive: bool) -> io::Result<u64> {
        let (dir, name) = self.parent(path, false)?;
        let st = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            rustix::fs::unlinkat(&dir, &name, AtFlags::empty())?;
            return Ok(1);
        }
        if !recursive {
            rustix::fs::unlinkat(&dir, &name, AtFlags::REMOVEDIR)?;
            return Ok(1);
        }
        let mut count = 0;
        remove_tree(&dir, &name, 0, &mut count)?;
        Ok(count)
    }

    /// Renames `from` to `to`, replacing what is at `to` as rename(2) does.
    pub fn rename(&self, from: &InnerPath, to: &InnerPath) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from, false)?;
        let (to_dir, to_name) = self.parent(to, false)?;
        Ok(rustix::fs::renameat(
            &from_dir, &from_name, &to_dir, &to_name,
        )?)
    }

    /// Copies `from` to `to` (a directory only with `recursive`, merged
    /// into `to` when it exists); symlinks are copied as symlinks, other
    /// special files skipped. Returns the entries copied.
    pub fn copy(&self, from: &InnerPath, to: &InnerPath, recursive: bool) -> io::Result<u64> {
        let _acting = ActingAs::owner(self.owner)?;
        let (from_dir, from_name) = self.parent(from, false)?;
        let (to_dir, to_name) = self.parent(to, false)?;
        let mut count = 0;
        let mut copy = Copy {
            recursive,
            count: &mut count,
        };
        copy.entry(&from_dir, &from_name, &to_dir, &to_name, 0)?;
        Ok(count)
    }

    /// The subdirectories of `dir`, each an `O_PATH` fd found one name at
    /// a time (never through a symlink or into another mount).
    pub fn subdirs(&self, dir: &OwnedFd) -> io::Result<Vec<(std::ffi::OsString, OwnedFd)>> {
        let real = crate::layer::reopen(dir)?;
        let mut out = Vec::new();
        for name in names(&real)? {
            let Ok(st) = rustix::fs::statat(&real, &name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                continue;
            }
            if let Ok(fd) = open_below(&real, &name, OFlags::PATH | OFlags::DIRECTORY) {
                out.push((name, fd));
            }
        }
        Ok(out)
    }

    /// Sets `path`'s permission bits (and, with `recursive`, those of all
    /// below it but symlinks); returns the entries changed.
    pub fn chmod(&self, path: &InnerPath, mode: u32, recursive: bool) -> io::Result<u64> {
        let fd = self.open(path, OFlags::PATH)?;
        chmod_fd(&fd, mode)?;
        let mut count = 1;
        let st = rustix::fs::fstat(&fd)?;
        if recursive && FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            chmod_tree(&fd, mode, 0, &mut count)?;
        }
        Ok(count)
    }
}

/// The target of the symlink `name` in `dir` (`st` its own stat), read,
/// never followed; `None` when it is no symlink or its target no UTF-8.
fn link_target<P: rustix::path::Arg>(dir: &impl AsFd, name: P, st: &Stat) -> Option<String> {
    if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
        return None;
    }
    let target = rustix::fs::readlinkat(dir, name, Vec::new()).ok()?;
    target.into_string().ok()
}

/// A name for a file being made beside its final one: `.hull-WHAT-` and
/// random hex.
fn temp_name(what: &str) -> io::Result<OsString> {
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(io::Error::other)?;
    Ok(OsString::from(format!(
        ".hull-{what}-{:016x}",
        u64::from_ne_bytes(random)
    )))
}

fn entry(name: String, path: String, st: &Stat, target: Option<String>) -> FileEntry {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => FileKind::File,
        FileType::Directory => FileKind::Directory,
        FileType::Symlink => FileKind::Symlink,
        _ => FileKind::Other,
    };
    FileEntry {
        name,
        path,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode & 0o7777,
        mtime: st.st_mtime,
        kind,
        target,
    }
}

/// A directory's names but `.` and `..`, read before any is changed.
pub fn names(dir: &impl AsFd) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(out)
}

pub fn open_below(dir: &impl AsFd, name: &OsStr, flags: OFlags) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        dir,
        name,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        BENEATH,
    )?)
}

/// The `O_PATH` fd's own inode, opened for real only if it is a regular
/// file: a device node or FIFO the inner made is never opened by hulld.
/// Through /proc/self/fd, so it is the same inode whatever is renamed
/// meanwhile.
fn reopen_regular(fd: &OwnedFd, flags: OFlags) -> io::Result<File> {
    match FileType::from_raw_mode(rustix::fs::fstat(fd)?.st_mode) {
        FileType::RegularFile => {}
        FileType::Directory => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file (a device, FIFO or socket)",
            ))
        }
    }
    let own = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(File::from(rustix::fs::open(
        own,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )?))
}

/// fchmod refuses `O_PATH` fds, and chmod by name could be raced onto a
/// symlink: the fd's own /proc entry names exactly its inode.
fn chmod_fd(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    let own = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::chmod(own, Mode::from_raw_mode(mode & 0o7777))?)
}

/// sync_file_range(2), which neither rustix nor nix wraps.
fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    let offset = i64::try_from(offset).map_err(io::Error::other)?;
    let len = i64::try_from(len).map_err(io::Error::other)?;
    // SAFETY: sync_file_range takes a valid fd (borrowed from `file` for the
    // call), plain integers and flags; it touches no memory of ours.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn too_deep() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("the tree is more than {MAX_DEPTH} directories deep"),
    )
}

fn is_dir(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

fn remove_tree(parent: &OwnedFd, name: &OsStr, depth: usize, count: &mut u64) -> io::Result<()> {
    refuse_mount_point(parent, name)?;
    let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if !is_dir(&st) {
        rustix::fs::unlinkat(parent, name, AtFlags::empty())?;
        *count += 1;
        return Ok(());
    }
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    let dir = open_below(parent, name, OFlags::RDONLY | OFlags::DIRECTORY)?;
    for child in names(&dir)? {
        remove_tree(&dir, &child, depth + 1, count)?;
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?;
    *count += 1;
    Ok(())
}

fn chmod_tree(dir: &OwnedFd, mode: u32, depth: usize, count: &mut u64) -> io::Result<()> {
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    let real = crate::layer::reopen(dir)?;
    for name in names(&real)? {
        let st = rustix::fs::statat(&real, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            continue;
        }
        let fd = open_below(&real, &name, OFlags::PATH)?;
        chmod_fd(&fd, mode)?;
        *count += 1;
        if is_dir(&st) {
            chmod_tree(&fd, mode, depth + 1, count)?;
        }
    }
    Ok(())
}

struct Copy<'a> {
    recursive: bool,
    count: &'a mut u64,
}

impl Copy<'_> {
    fn entry(
        &mut self,
        from_dir: &OwnedFd,
        from: &OsStr,
        to_dir: &OwnedFd,
        to: &OsStr,
        depth: usize,
    ) -> io::Result<()> {
        refuse_mount_point(from_dir, from)?;
        let st = rustix::fs::statat(from_dir, from, AtFlags::SYMLINK_NOFOLLOW)?;
        let perm = st.st_mode & 0o7777;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                if !self.recursive {
                    return Err(io::Error::from_raw_os_error(libc::EISDIR));
                }
                if depth >= MAX_DEPTH {
                    return Err(too_deep());
                }
                let src = open_below(from_dir, from, OFlags::RDONLY | OFlags::DIRECTORY)?;
                match rustix::fs::mkdirat(to_dir, to, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                let dst = open_below(to_dir, to, OFlags::PATH | OFlags::DIRECTORY)?;
                for name in names(&src)? {
                    self.entry(&src, &name, &dst, &name, depth + 1)?;
                }
                let real = crate::layer::reopen(&dst)?;
                rustix::fs::fchmod(&real, Mode::from_raw_mode(perm))?;
            }
            FileType::RegularFile => {
                let fd = open_below(from_dir, from, OFlags::PATH)?;
                let mut src = reopen_regular(&fd, OFlags::RDONLY)?;
                let mut upload = Upload::begin(to_dir.try_clone()?, to.to_os_string())?;
                // std's copy uses copy_file_range: in the kernel, and a
                // reflink where the filesystem has them.
                io::copy(&mut src, &mut upload.file)?;
                upload.finish(perm)?;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(from_dir, from, Vec::new())?;
                rustix::fs::symlinkat(target.as_c_str(), to_dir, to)?;
            }
            _ => return Ok(()),
        }
        *self.count += 1;
        Ok(())
    }
}

/// While alive, this thread makes files as the inner's root: its
/// filesystem ids are the owner's, so what it creates belongs to the
/// inner's root, and an idmapped layer (which refuses ids outside its
/// map) accepts it. Taking a non-zero fsuid drops the capabilities that
/// override permissions; they are raised again, since the inner's root
/// has them over its own files. Dropping the guard gives the thread its
/// ids back (and with fsuid 0 the kernel restores those capabilities).
struct ActingAs {
    changed: bool,
}

impl ActingAs {
    fn owner(owner: Owner) -> io::Result<ActingAs> {
        if owner.uid == 0 && owner.gid == 0 {
            return Ok(ActingAs { changed: false });
        }
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(owner.gid));
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(owner.uid));
        let acting = ActingAs { changed: true };
        for cap in [
            caps::Capability::CAP_DAC_OVERRIDE,
            caps::Capability::CAP_DAC_READ_SEARCH,
            caps::Capability::CAP_FOWNER,
        ] {
            caps::raise(None, caps::CapSet::Effective, cap).map_err(io::Error::other)?;
        }
        Ok(acting)
    }
}

impl Drop for ActingAs {
    fn drop(&mut self) {
        if self.changed {
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(0));
        }
    }
}

/// A file being written under a temporary name in its directory; renamed
/// over the target by [`Upload::finish`], removed if dropped before, so a
/// write cut short leaves nothing behind.
pub struct Upload {
    dir: OwnedFd,
    temp: OsString,
    name: OsString,
    file: File,
    size: u64,
    done: bool,
    /// The thread's ids while the upload is written, given back after.
    acting: Option<ActingAs>,
}

impl Upload {
    fn begin(dir: OwnedFd, name: OsString) -> io::Result<Upload> {
        // The rename at the end would put the file in the mount's place.
        refuse_mount_point(&dir, &name)?;
        if let Ok(st) = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
            if is_dir(&st) {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
        }
        let temp = temp_name("upload")?;
        let fd = rustix::fs::openat(
            &dir,
            &temp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        Ok(Upload {
            dir,
            temp,
            name,
            file: File::from(fd),
            size: 0,
            done: false,
            acting: None,
        })
    }

    /// The file being written, for a writer of another process.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Counts bytes written to [`Upload::file`] (by another process, at
    /// most a pipe's worth behind), starting their writeback as
    /// [`Upload::write`] does.
    pub fn wrote(&mut self, bytes: u64) -> io::Result<()> {
        let before = self.size;
        self.size += bytes;
        if before / WRITEBACK_WINDOW != self.size / WRITEBACK_WINDOW {
            self.write_back()?;
        }
        Ok(())
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.wrote(data.len() as u64)
    }

    /// Starts writeback of the window just filled and waits for that of
    /// the one before, so at most two windows of an upload are dirty at a
    /// time: written by hulld, its page cache is charged to hulld's own
    /// cgroup, whose memory limit is small and whose dirty pages cannot be
    /// reclaimed until written; and either way the disk gets a steady
    /// stream instead of a burst at the kernel's dirty threshold.
    fn write_back(&self) -> io::Result<()> {
        let end = self.size - self.size % WRITEBACK_WINDOW;
        let start = end.saturating_sub(WRITEBACK_WINDOW);
        sync_file_range(
            &self.file,
            start,
            WRITEBACK_WINDOW,
            libc::SYNC_FILE_RANGE_WRITE,
        )?;
        if start >= WRITEBACK_WINDOW {
            sync_file_range(
                &self.file,
                start - WRITEBACK_WINDOW,
                WRITEBACK_WINDOW,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )?;
        }
        Ok(())
    }

    /// Gives the file `mode` and puts it at its name; returns its size.
    pub fn finish(mut self, mode: u32) -> io::Result<u64> {
        rustix::fs::fchmod(&self.file, Mode::from_raw_mode(mode & 0o7777))?;
        // Asked again: the body may have taken long.
        refuse_mount_point(&self.dir, &self.name)?;
        rustix::fs::renameat(&self.dir, &self.temp, &self.dir, &self.name)?;
        self.done = true;
        Ok(self.size)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done {
            let _ = rustix::fs::unlinkat(&self.dir, &self.temp, AtFlags::empty());
        }
    }
}

/// Where an upload's bytes go: through a writer process in the inner's
/// cgroup (so their page cache is the inner's), or, when there is none,
/// into the file from hulld.
pub enum UploadSink {
    Charged(ChargedWriter),
    Direct,
}

/// A writer process and the pipe to its stdin; killed and reaped if the
/// upload ends without [`UploadSink::finish`].
pub struct ChargedWriter {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl UploadSink {
    /// Through `writer` (a process copying its stdin into the upload's
    /// file), or into the file from this process when there is none.
    pub fn start(writer: Option<std::process::Child>) -> UploadSink {
        let Some(mut child) = writer else {
            return UploadSink::Direct;
        };
        let stdin = child.stdin.take();
        UploadSink::Charged(ChargedWriter { child, stdin })
    }

    pub fn write(&mut self, upload: &mut Upload, data: &[u8]) -> io::Result<()> {
        match self {
            UploadSink::Direct => upload.write(data),
            UploadSink::Charged(w) => {
                let written = match w.stdin.as_mut() {
                    Some(stdin) => io::Write::write_all(stdin, data),
                    None => Err(io::Error::from_raw_os_error(libc::EPIPE)),
                };
                match written {
                    Ok(()) => upload.wrote(data.len() as u64),
                    // The writer stopped: its exit says why.
                    Err(e) => Err(w.end().err().unwrap_or(e)),
                }
            }
        }
    }

    /// Waits for the writer to have written everything.
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            UploadSink::Direct => Ok(()),
            UploadSink::Charged(w) => w.end(),
        }
    }
}

impl ChargedWriter {
    /// Closes its stdin and waits for it: its exit code is 0 or the errno
    /// of its failure.
    fn end(&mut self) -> io::Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        match status.code() {
            Some(0) => Ok(()),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Err(io::Error::other(
                "the upload's writer was killed (the sandbox stopped?)",
            )),
        }
    }
}

impl Drop for ChargedWriter {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
