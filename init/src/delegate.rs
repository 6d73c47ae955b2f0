//! `hull.cgroup=PATH` on the kernel command line: hulld starts as a member
//! of the cgroup PATH (`/system.slice/hull.service`) instead of the root,
//! as systemd starts a unit with `Delegate=yes` (dist/hull.service). That
//! is how hull runs on a stock distribution; booting the VM this way holds
//! hulld to it.
//!
//! Like systemd, hull-init creates the group and enables every controller
//! on its ancestors, leaving the group's own `cgroup.subtree_control` to
//! hulld, which owns what is below. hulld joins the group between fork and
//! exec (`cgroup.procs`, written by the child itself), so it is a member
//! from its first instruction. When hulld has ended, the next start first
//! kills what is left in the group and removes the groups below it, as
//! systemd does between a delegated unit's runs: the groups hulld made
//! would otherwise keep the group from taking a process.

use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The cgroup2 mount point.
const ROOT: &str = "/sys/fs/cgroup";
const PARAM: &str = "hull.cgroup=";
/// How long the processes left in the group have to die after cgroup.kill.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The group of `hull.cgroup=`, once the boot step has made it.
static GROUP: OnceLock<PathBuf> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum DelegateError {
    #[error("{PARAM}{value}: expected an absolute cgroup path below the root, such as /system.slice/hull.service")]
    BadPath { value: String },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enable the controllers {controllers:?} in {path}")]
    Controllers {
        controllers: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot kill what is left in the cgroup through {path}")]
    Kill {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the processes left in {path} did not die within {waited:?}")]
    KillTimeout { path: PathBuf, waited: Duration },
    #[error("cannot remove the cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path} for hulld to join the cgroup")]
    OpenProcs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The cgroup `hull.cgroup=` in `cmdline` names, relative to the
/// hierarchy's root; `None` when there is none. The last one counts, as
/// with `ip=`.
pub fn parse(cmdline: &str) -> Result<Option<PathBuf>, DelegateError> {
    let Some(value) = cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(PARAM))
        .next_back()
    else {
        return Ok(None);
    };
    let bad = || DelegateError::BadPath {
        value: value.to_owned(),
    };
    let Some(below_root) = value.strip_prefix('/') else {
        return Err(bad());
    };
    let mut relative = PathBuf::new();
    for name in below_root.split('/').filter(|n| !n.is_empty()) {
        if name == "." || name == ".." {
            return Err(bad());
        }
        relative.push(name);
    }
    if relative.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(Some(relative))
}

/// The boot step: with `hull.cgroup=` on the command line, creates the
/// group below `/sys/fs/cgroup` with the controllers of its ancestors
/// enabled for it. Returns the group and the controllers it has.
pub fn set_up(cmdline: &str) -> Result<Option<(PathBuf, String)>, DelegateError> {
    let Some(relative) = parse(cmdline)? else {
        return Ok(None);
    };
    let group = create(Path::new(ROOT), &relative)?;
    let controllers = read(&group.join("cgroup.controllers"))?;
    let _ = GROUP.set(group.clone());
    Ok(Some((group, controllers.trim().to_owned())))
}

/// Creates `root/relative` and its missing parents, enabling on `root`
/// and every group between it and the new group whatever controllers each
/// has. Returns the group's directory.
pub fn create(root: &Path, relative: &Path) -> Result<PathBuf, DelegateError> {
    let mut dir = root.to_path_buf();
    for name in relative.iter() {
        enable_all(&dir)?;
        dir.push(name);
        match fs::create_dir(&dir) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                return Err(DelegateError::Create {
                    path: dir,
                    source: e,
                })
            }
            _ => {}
        }
    }
    Ok(dir)
}

/// Enables for the children of `dir` every controller `dir` has; returns
/// them as written. The one way hull-init enables controllers: at the
/// root at boot, and down a delegated group's ancestors.
pub fn enable_all(dir: &Path) -> Result<String, DelegateError> {
    let available = read(&dir.join("cgroup.controllers"))?;
    let controllers = available
        .split_ascii_whitespace()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if controllers.is_empty() {
        return Ok(controllers);
    }
    let path = dir.join("cgroup.subtree_control");
    fs::write(&path, &controllers).map_err(|source| DelegateError::Controllers {
        controllers: controllers.clone(),
        path,
        source,
    })?;
    Ok(controllers)
}

fn read(path: &Path) -> Result<String, DelegateError> {
    fs::read_to_string(path).map_err(|source| DelegateError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Where the next hulld starts: the group, and its `cgroup.procs` open
/// for the child to write itself into (close-on-exec).
pub struct Start {
    pub group: PathBuf,
    pub procs: File,
    /// A hulld before this one left processes or groups, now gone.
    pub cleared: bool,
}

/// Readies the group of `hull.cgroup=` for a new hulld; `None` when hulld
/// starts in the root.
pub fn prepare_start() -> Result<Option<Start>, DelegateError> {
    let Some(group) = GROUP.get() else {
        return Ok(None);
    };
    let cleared = clear(group)?;
    let path = group.join("cgroup.procs");
    let procs = File::options()
        .write(true)
        .open(&path)
        .map_err(|source| DelegateError::OpenProcs { path, source })?;
    Ok(Some(Start {
        group: group.clone(),
        procs,
        cleared,
    }))
}

/// Kills whatever is in `group` and below, and makes it a fresh group again:
/// the groups a hulld made below it are removed, and its own
/// `cgroup.subtree_control`, which hulld wrote and which bars processes
/// from the group, goes with the group, made again. Returns whether there
/// was anything to clear.
fn clear(group: &Path) -> Result<bool, DelegateError> {
    let subtree = read(&group.join("cgroup.subtree_control"))?;
    let populated = read(&group.join("cgroup.events"))?
        .lines()
        .any(|line| line.trim() == "populated 1");
    if subtree.trim().is_empty() && !populated && subgroups(group).is_empty() {
        return Ok(false);
    }
    let kill = group.join("cgroup.kill");
    fs::write(&kill, "1").map_err(|source| DelegateError::Kill { path: kill, source })?;
    let events = group.join("cgroup.events");
    let deadline = Instant::now() + KILL_WAIT;
    while read(&events)?
        .lines()
        .any(|line| line.trim() == "populated 1")
    {
        if Instant::now() >= deadline {
            return Err(DelegateError::KillTimeout {
                path: group.to_path_buf(),
                waited: KILL_WAIT,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut all = vec![group.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        let below = subgroups(&all[i]);
        all.extend(below);
        i += 1;
    }
    for dir in all.iter().rev() {
        remove(dir)?;
    }
    fs::create_dir(group).map_err(|source| DelegateError::Create {
        path: group.to_path_buf(),
        source,
    })?;
    Ok(true)
}

fn subgroups(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// rmdir(2) of a cgroup, retried while the kernel still frees the
/// processes that were just killed in it.
fn remove(dir: &Path) -> Result<(), DelegateError> {
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(DelegateError::Remove {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// The cgroup v2 path /proc/`pid`/cgroup lists, for the console.
pub fn cgroup_of(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
        })
        .unwrap_or_else(|| "(unknown)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of the test's own, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("hull-init-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_path_is_absolute_below_the_root_and_the_last_one_counts() {
        fn parse(cmdline: &str) -> Result<Option<PathBuf>, String> {
            super::parse(cmdline).map_err(|e| e.to_string())
        }
        assert_eq!(parse("console=ttyS0 quiet"), Ok(None));
        assert_eq!(
            parse("hull.cgroup=/system.slice/hull.service quiet"),
            Ok(Some(PathBuf::from("system.slice/hull.service")))
        );
        assert_eq!(
            parse("hull.cgroup=/a hull.cgroup=/b/c/"),
            Ok(Some(PathBuf::from("b/c")))
        );
        for bad in ["/", "relative", "/a/../b", "/a/./b", ""] {
            let err = parse(&format!("hull.cgroup={bad}")).unwrap_err();
            assert!(err.contains("absolute cgroup path"), "{bad}: {err}");
        }
    }

    #[test]
    fn every_ancestor_gets_its_controllers_and_the_group_none() {
        let root = TempDir::new("ancestors");
        let slice = root.path().join("system.slice");
        fs::create_dir_all(&slice).unwrap();
        for dir in [root.path(), &slice] {
            fs::write(dir.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        }
        let group = create(root.path(), Path::new("system.slice/hull.service")).unwrap();
        assert_eq!(group, slice.join("hull.service"));
        assert!(group.is_dir());
        for dir in [root.path(), &slice] {
            assert_eq!(
                fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap(),
                "+cpu +memory +pids"
            );
        }
        // The group's own subtree_control is hulld's.
        assert!(!group.join("cgroup.subtree_control").exists());
    }

    /// Where a cgroup2 hierarchy is mounted: /sys/fs/cgroup in a VM,
    /// /sys/fs/cgroup/unified beside the v1 ones on a hybrid host.
    fn cgroup2_mount() -> Option<PathBuf> {
        let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
        mounts.lines().find_map(|line| {
            let mut fields = line.split(' ');
            let (_, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
    }

    #[test]
    fn clearing_kills_what_a_hulld_left_and_makes_the_group_fresh() {
        let root = match cgroup2_mount() {
            Some(root) if nix::unistd::geteuid().is_root() => root,
            _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("this test needs root and a cgroup2 mount, and CI=true forbids skipping")
            }
            _ => {
                eprintln!("skipping: needs root and a cgroup2 mount");
                return;
            }
        };
        let group = root.join(format!("hull-init-test-{}", std::process::id()));
        let inner = group.join("hull/inner");
        fs::create_dir_all(&inner).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let joined = fs::write(inner.join("cgroup.procs"), child.id().to_string());
        let cleared = joined
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|()| clear(&group).map_err(|e| e.to_string()));
        if cleared.is_err() {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        let fresh = subgroups(&group);
        let again = clear(&group).map_err(|e| e.to_string());
        let _ = fs::remove_dir(&inner);
        let _ = fs::remove_dir(group.join("hull"));
        let _ = fs::remove_dir(&group);
        assert_eq!(cleared, Ok(true));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(fresh.is_empty(), "{fresh:?}");
        assert_eq!(again, Ok(false), "a fresh group has nothing to clear");
    }

    #[test]
    fn a_missing_ancestor_is_named() {
        let root = TempDir::new("missing");
        let err = create(root.path(), Path::new("a/b")).unwrap_err();
        assert!(
            matches!(&err, DelegateError::Read { path, .. } if path == &root.path().join("cgroup.controllers")),
            "{err}"
        );
    }
}
