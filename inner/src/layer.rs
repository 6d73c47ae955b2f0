//! Paths inside the user's layer, resolved before pivot_root with the
//! init's full privilege. The layer is the user's: any of its components
//! may be a symlink to anywhere. Every lookup is an openat2(2) relative to
//! the merged root with RESOLVE_IN_ROOT, so a symlink resolves as it would
//! after pivot_root (inside the layer, never on the host), and a missing
//! directory is made with mkdirat(2) in a directory found that way.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxAttributes, StatxFlags};

/// Symlinks followed while making one directory, as the kernel's limit
/// on nested links: a loop of links ends in ELOOP.
const MAX_LINKS: usize = 40;

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// The merged root of the inner, as an fd: the anchor of every lookup.
pub struct Layer {
    root: OwnedFd,
}

impl Layer {
    /// Opens the root. `path` is hulld's (the overlay's mount point), not
    /// the user's, so it is opened as an ordinary path.
    pub fn open(path: &Path) -> io::Result<Layer> {
        let root = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Layer { root })
    }

    /// A root already open (the running inner's, through /proc).
    pub fn from_fd(root: OwnedFd) -> Layer {
        Layer { root }
    }

    /// `rel` opened with `flags` (O_CLOEXEC added), as the inner would
    /// after pivot_root, refused if it leads into another mount.
    pub fn open_in_layer(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        self.resolve(rel, flags, RESOLVE | ResolveFlags::NO_XDEV)
    }

    /// `rel` opened with `flags` (O_CLOEXEC added), as the inner would
    /// after pivot_root.
    pub fn open_at(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        self.resolve(rel, flags, RESOLVE)
    }

    fn resolve(&self, rel: &Path, flags: OFlags, resolve: ResolveFlags) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        Ok(rustix::fs::openat2(
            &self.root,
            rel,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        )?)
    }

    /// An O_PATH fd of `rel`, whatever it is: a mount target.
    pub fn path_fd(&self, rel: &Path) -> io::Result<OwnedFd> {
        self.open_at(rel, OFlags::PATH)
    }

    /// The directory `rel`, made (with `mode`, as mkdir -p) where missing.
    /// A dangling symlink on the way is followed and its target made inside
    /// the layer, as mkdir -p would after pivot_root. The directory is on
    /// the layer itself: a path that leads into another mount (a symlink
    /// to /proc/sys ...) is refused.
    pub fn make_dir(&self, rel: &Path, mode: u32) -> io::Result<OwnedFd> {
        self.make_dir_in_layer(rel, mode)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EXDEV) => io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a symlink there leads out of the layer, into another mount",
                ),
                _ => e,
            })
    }

    /// Whether `fd` is the root itself.
    pub fn is_root(&self, fd: &impl AsFd) -> io::Result<bool> {
        let (a, b) = (rustix::fs::fstat(&self.root)?, rustix::fs::fstat(fd)?);
        Ok(a.st_dev == b.st_dev && a.st_ino == b.st_ino)
    }

    /// As [`Layer::make_dir`], with a path into another mount failing
    /// with EXDEV itself, for callers that report errnos.
    pub fn make_dir_in_layer(&self, rel: &Path, mode: u32) -> io::Result<OwnedFd> {
        let mut want = normal(rel);
        let mut links = 0;
        'restart: loop {
            let mut done = PathBuf::new();
            let mut parent = self.dir(&done)?;
            let parts: Vec<PathBuf> = want.iter().map(PathBuf::from).collect();
            for (i, part) in parts.iter().enumerate() {
                let next = done.join(part);
                match self.dir(&next) {
                    Ok(fd) => {
                        parent = fd;
                        done = next;
                        continue;
                    }
                    Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
                    Err(_) => {}
                }
                match rustix::fs::mkdirat(&parent, part, Mode::from_raw_mode(mode)) {
                    Ok(()) => {
                        // The umask narrowed the mode.
                        let made = self.dir(&next)?;
                        rustix::fs::fchmod(reopen(&made)?, Mode::from_raw_mode(mode))?;
                        parent = made;
                        done = next;
                    }
                    Err(rustix::io::Errno::EXIST) => {
                        // A dangling symlink: make its target instead.
                        links += 1;
                        if links > MAX_LINKS {
                            return Err(io::Error::from_raw_os_error(libc::ELOOP));
                        }
                        let target = rustix::fs::readlinkat(&parent, part, Vec::new())?;
                        let target = PathBuf::from(OsString::from_vec(target.into_bytes()));
                        let mut rest = done.join(target);
                        for p in &parts[i + 1..] {
                            rest.push(p);
                        }
                        want = normal(&rest);
                        continue 'restart;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(parent);
        }
    }

    fn dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        self.open_in_layer(rel, OFlags::PATH | OFlags::DIRECTORY)
    }
}

/// `rel` without a leading `/`, `.` or `..` parts, so mkdirat is never
/// handed a `..`. Lexical: a `..` after a symlink may land elsewhere than
/// the kernel's walk would, but, like RESOLVE_IN_ROOT, never above the root.
fn normal(rel: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Whether `name`, an entry of the directory `dir`, has something mounted
/// on it: its mount is not the directory's. RESOLVE_NO_XDEV keeps a walk
/// from crossing into another mount, but calls that act on a name in a
/// directory (unlink, rmdir, rename) never cross it: from a mount namespace
/// where the name is not a mount point, the kernel lets them remove or
/// replace it and detaches whatever other namespaces (the inner's) had
/// mounted there. A missing name is no mount point.
pub fn is_mount_point(dir: &impl AsFd, name: &OsStr) -> io::Result<bool> {
    // The path walk of the last name steps onto what is mounted there;
    // NO_AUTOMOUNT, so looking does not mount anything.
    let at = AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT;
    let entry = match rustix::fs::statx(dir, name, at, StatxFlags::MNT_ID) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let here = rustix::fs::statx(dir, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    let mnt_id = StatxFlags::MNT_ID.bits();
    if entry.stx_mask & here.stx_mask & mnt_id != 0 {
        return Ok(entry.stx_mnt_id != here.stx_mnt_id);
    }
    // Kernels before 5.8 have no mount ids; some say whether an inode is
    // a mount's root, and a mount of another filesystem has another device.
    if entry
        .stx_attributes_mask
        .contains(StatxAttributes::MOUNT_ROOT)
    {
        return Ok(entry.stx_attributes.contains(StatxAttributes::MOUNT_ROOT));
    }
    Ok((entry.stx_dev_major, entry.stx_dev_minor) != (here.stx_dev_major, here.stx_dev_minor))
}

/// EXDEV when `name` in `dir` is a mount point (see [`is_mount_point`]).
pub fn refuse_mount_point(dir: &impl AsFd, name: &OsStr) -> io::Result<()> {
    if is_mount_point(dir, name)? {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    Ok(())
}

/// A real fd of the directory an O_PATH fd names (fchmod refuses O_PATH).
pub fn reopen(fd: &impl AsFd) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn make_dir_follows_symlinks_inside_the_root_only() {
        let host = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let bait = host.path().join("bait");
        // Absolute and relative links, dangling and not, and a `..` that
        // would climb out of the root.
        symlink(&bait, root.path().join("abs")).unwrap();
        symlink("../../../../..", root.path().join("up")).unwrap();
        std::fs::create_dir(root.path().join("real")).unwrap();
        symlink("real", root.path().join("rel")).unwrap();
        let layer = Layer::open(root.path()).unwrap();
        layer.make_dir(Path::new("abs/x"), 0o755).unwrap();
        layer.make_dir(Path::new("up/tmp/y"), 0o700).unwrap();
        layer.make_dir(Path::new("rel/z"), 0o755).unwrap();
        assert!(!bait.exists());
        let inside = root.path().join(bait.strip_prefix("/").unwrap()).join("x");
        assert!(inside.is_dir(), "{}", inside.display());
        assert!(root.path().join("tmp/y").is_dir());
        assert!(root.path().join("real/z").is_dir());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.path().join("tmp/y"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o700);
    }

    #[test]
    fn make_dir_refuses_a_path_into_another_mount() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "needs root to mount");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let mnt = root.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64k"),
        )
        .unwrap();
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(mnt.clone());
        symlink("/mnt/inside", root.path().join("etc")).unwrap();
        let layer = Layer::open(root.path()).unwrap();
        let err = layer.make_dir(Path::new("etc"), 0o755).err().unwrap();
        assert!(err.to_string().contains("out of the layer"), "{err}");
        assert!(!mnt.join("inside").exists());
        let top = layer.make_dir(Path::new("."), 0o755).unwrap();
        assert!(layer.is_root(&top).unwrap());
    }

    #[test]
    fn mount_points_are_told_apart_from_plain_entries() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "needs root to mount");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let (dir, file) = (root.path().join("dir"), root.path().join("file"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(&file, "under").unwrap();
        std::fs::write(root.path().join("plain"), "x").unwrap();
        symlink("dir", root.path().join("link")).unwrap();
        struct Unmount(Vec<PathBuf>);
        impl Drop for Unmount {
            fn drop(&mut self) {
                for p in &self.0 {
                    let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        // A tmpfs on a directory, and a file of the same filesystem bound
        // on another (as the inner's resolv.conf is).
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64k"),
        )
        .unwrap();
        let _unmount = Unmount(vec![dir.clone(), file.clone()]);
        nix::mount::mount(
            Some(&root.path().join("plain")),
            &file,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let top = Layer::open(root.path()).unwrap();
        let is = |name: &str| is_mount_point(&top.root, OsStr::new(name)).unwrap();
        assert!(is("dir") && is("file"));
        assert!(!is("plain") && !is("link") && !is("missing"));
        let err = refuse_mount_point(&top.root, OsStr::new("file")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
    }

    #[test]
    fn a_loop_of_links_ends_in_eloop() {
        let root = tempfile::tempdir().unwrap();
        symlink("b", root.path().join("a")).unwrap();
        symlink("a", root.path().join("b")).unwrap();
        let layer = Layer::open(root.path()).unwrap();
        let err = layer.make_dir(Path::new("a/x"), 0o755).err().unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }
}
