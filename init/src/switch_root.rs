//! Moves the initramfs into a tmpfs mounted over `/`. The kernel's
//! initramfs is the "rootfs" mount, which pivot_root(2) refuses (EINVAL),
//! and the inner's start-up pivots its root: so, as switch_root(8) does,
//! PID 1 copies the tree into a tmpfs, deleting each file as it goes (the
//! memory is used once, not twice), moves that mount over `/`, chroots
//! into it and executes itself again.

use std::convert::Infallible;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};

/// Set on the second execution, which runs on the tmpfs.
pub const SWITCHED_ENV: &str = "HULL_INIT_SWITCHED";
const NEW_ROOT: &str = "/newroot";

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("cannot mount a tmpfs at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot move {path} into the new root")]
    Copy {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot move the mount {path} over /")]
    MoveMount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot chroot into {path}")]
    Chroot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot execute {path} again on the new root")]
    Exec {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether `/` may be the kernel's initramfs: a ramfs or tmpfs, on the
/// first execution (the tmpfs it moves to is one too).
pub fn needed() -> bool {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    nix::sys::statfs::statfs("/").is_ok_and(|s| {
        let magic = s.filesystem_type().0;
        magic == RAMFS_MAGIC || magic == TMPFS_MAGIC
    })
}

/// Moves the tree (telling `log` how many bytes) and executes `/init`
/// again from the new root: it returns only with an error.
pub fn switch(log: &mut dyn FnMut(u64)) -> Result<Infallible, SwitchError> {
    let new_root = Path::new(NEW_ROOT);
    fs::create_dir_all(new_root).map_err(|source| SwitchError::Copy {
        path: new_root.into(),
        source,
    })?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|source| SwitchError::Mount {
        path: new_root.into(),
        source,
    })?;
    let moved = move_tree(Path::new("/"), new_root, new_root)?;
    log(moved);
    std::env::set_current_dir(new_root).map_err(|source| SwitchError::Chroot {
        path: new_root.into(),
        source,
    })?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| {
        SwitchError::MoveMount {
            path: new_root.into(),
            source,
        }
    })?;
    std::os::unix::fs::chroot(".").map_err(|source| SwitchError::Chroot {
        path: new_root.into(),
        source,
    })?;
    std::env::set_current_dir("/").map_err(|source| SwitchError::Chroot {
        path: new_root.into(),
        source,
    })?;
    let source = std::process::Command::new("/init")
        .env(SWITCHED_ENV, "1")
        .exec();
    Err(SwitchError::Exec {
        path: "/init".into(),
        source,
    })
}

/// Moves everything under `from` (but `skip`) to `to`; returns the bytes
/// of the regular files moved.
fn move_tree(from: &Path, to: &Path, skip: &Path) -> Result<u64, SwitchError> {
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SwitchError::Copy { path, source }
    };
    let mut bytes = 0;
    for entry in fs::read_dir(from).map_err(error(from))? {
        let entry = entry.map_err(error(from))?;
        let path = entry.path();
        if path == skip {
            continue;
        }
        let target = to.join(entry.file_name());
        let meta = fs::symlink_metadata(&path).map_err(error(&path))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            fs::create_dir(&target).map_err(error(&target))?;
            fs::set_permissions(&target, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(error(&target))?;
            bytes += move_tree(&path, &target, skip)?;
            fs::remove_dir(&path).map_err(error(&path))?;
        } else if kind.is_symlink() {
            let link = fs::read_link(&path).map_err(error(&path))?;
            std::os::unix::fs::symlink(link, &target).map_err(error(&target))?;
            fs::remove_file(&path).map_err(error(&path))?;
        } else if kind.is_file() {
            bytes += fs::copy(&path, &target).map_err(error(&target))?;
            fs::remove_file(&path).map_err(error(&path))?;
        } else if kind.is_char_device() || kind.is_block_device() {
            let file_type = if kind.is_char_device() {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            let rdev = meta.rdev();
            mknod(
                &target,
                file_type,
                Mode::from_bits_truncate(meta.mode() & 0o7777),
                rdev,
            )
            .map_err(|e| SwitchError::Copy {
                path: target.clone(),
                source: e.into(),
            })?;
            fs::remove_file(&path).map_err(error(&path))?;
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_files_links_and_directories_and_leaves_the_source_empty() {
        let from = tempfile_dir("from");
        let to = tempfile_dir("to");
        fs::create_dir_all(from.join("usr/bin")).unwrap();
        fs::write(from.join("usr/bin/tool"), "0123456789").unwrap();
        fs::set_permissions(from.join("usr/bin/tool"), fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("usr/bin", from.join("bin")).unwrap();
        let moved = move_tree(&from, &to, &from.join("nothing")).unwrap();
        assert_eq!(moved, 10);
        assert_eq!(
            fs::read_to_string(to.join("usr/bin/tool")).unwrap(),
            "0123456789"
        );
        assert_eq!(
            fs::metadata(to.join("usr/bin/tool")).unwrap().mode() & 0o777,
            0o751
        );
        assert_eq!(fs::read_link(to.join("bin")).unwrap(), Path::new("usr/bin"));
        assert_eq!(fs::read_dir(&from).unwrap().count(), 0);
        fs::remove_dir_all(&from).unwrap();
        fs::remove_dir_all(&to).unwrap();
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hull-init-switch-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
