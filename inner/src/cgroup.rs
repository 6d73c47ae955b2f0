//! cgroups for hulld and the inner: v2 where /sys/fs/cgroup is the unified
//! hierarchy, the v1 controllers otherwise (a hybrid host). Groups are always
//! created below the cgroup hulld itself was started in.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers hull uses; any of them may be missing on a host.
const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "freezer"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read the cgroup hulld runs in from {path}: {source}")]
    ReadOwn { path: PathBuf, source: io::Error },
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("processes in cgroup {path} did not die within {waited:?}")]
    KillTimeout { path: PathBuf, waited: Duration },
    #[error("no freezer: neither cgroup v2 nor the v1 freezer controller is available")]
    NoFreezer,
    #[error("processes in {path} did not freeze within {waited:?}")]
    FreezeTimeout { path: PathBuf, waited: Duration },
    #[error("no cgroup hierarchy with a memory or pids controller is mounted under {CGROUP_ROOT}")]
    NoHierarchy,
}

type Result<T> = std::result::Result<T, CgroupError>;

/// Which cgroup version the groups live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// One logical cgroup: a single directory on v2, one per controller on v1.
#[derive(Debug, Clone)]
pub struct Cgroup {
    version: Version,
    /// (controller, directory); the controller is "" on v2.
    dirs: Vec<(String, PathBuf)>,
}

/// The cgroup hull owns: `<hulld's own cgroup>/<name>`, with `daemon` and
/// `inner` below it.
#[derive(Debug, Clone)]
pub struct HullCgroups {
    pub base: Cgroup,
    pub daemon: Cgroup,
    pub inner: Cgroup,
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Parses /proc/self/cgroup into (controllers, path) rows.
fn own_cgroup_rows() -> Result<Vec<(String, String)>> {
    let path = PathBuf::from("/proc/self/cgroup");
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::ReadOwn {
        path: path.clone(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_string();
            let p = parts.next()?.to_string();
            Some((controllers, p))
        })
        .collect())
}

/// Strips `/<name>/daemon` from the end of hulld's own cgroup path so that a
/// restarted hulld (already moved into its daemon group) finds the same base.
fn base_below(own: &str, name: &str) -> PathBuf {
    let own = own.trim_end_matches('/');
    let suffix = format!("/{name}/daemon");
    let parent = own
        .strip_suffix(&suffix)
        .unwrap_or(own)
        .trim_start_matches('/');
    if parent.is_empty() {
        PathBuf::from(name)
    } else {
        PathBuf::from(format!("{parent}/{name}"))
    }
}

impl HullCgroups {
    /// Locates (does not create) hull's groups named `name` below hulld's own cgroup.
    pub fn locate(name: &str) -> Result<Self> {
        let rows = own_cgroup_rows()?;
        let base = if is_cgroup2(Path::new(CGROUP_ROOT)) {
            let own = rows
                .iter()
                .find(|(c, _)| c.is_empty())
                .map(|(_, p)| p.as_str())
                .unwrap_or("/");
            Cgroup {
                version: Version::V2,
                dirs: vec![(
                    String::new(),
                    Path::new(CGROUP_ROOT).join(base_below(own, name)),
                )],
            }
        } else {
            let mut dirs = Vec::new();
            for controller in V1_CONTROLLERS {
                let mount = Path::new(CGROUP_ROOT).join(controller);
                if !mount.join("cgroup.procs").exists() {
                    continue;
                }
                let own = rows
                    .iter()
                    .find(|(c, _)| c.split(',').any(|c| c == controller))
                    .map(|(_, p)| p.as_str())
                    .unwrap_or("/");
                dirs.push((controller.to_string(), mount.join(base_below(own, name))));
            }
            if dirs.is_empty() {
                return Err(CgroupError::NoHierarchy);
            }
            Cgroup {
                version: Version::V1,
                dirs,
            }
        };
        Ok(HullCgroups {
            daemon: base.child("daemon"),
            inner: base.child("inner"),
            base,
        })
    }

    /// Moves hulld back to the cgroup it started in and removes hull's
    /// groups; used by `hull down`, after the inner has stopped.
    pub fn teardown(&self) -> Result<()> {
        self.base.parent().join(std::process::id() as i32)?;
        self.inner.remove()?;
        self.daemon.remove()?;
        self.base.remove()
    }

    /// Creates the base group and, on v2, delegates the controllers the inner needs.
    pub fn create_base(&self) -> Result<()> {
        self.base.create()?;
        if self.base.version == Version::V2 {
            let dir = self.base.dirs[0].1.clone();
            // Controllers must be enabled on every ancestor; the parent of
            // our base may hold processes (it is hulld's own cgroup), which
            // v2 forbids only below the root, so try and report failures.
            if let Some(parent) = dir.parent() {
                enable_v2_controllers(parent)?;
            }
            enable_v2_controllers(&dir)?;
        }
        Ok(())
    }
}

fn enable_v2_controllers(dir: &Path) -> Result<()> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<String> = ["memory", "pids"]
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    write_file(&dir.join("cgroup.subtree_control"), &wanted.join(" "))
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

impl Cgroup {
    pub fn version(&self) -> Version {
        self.version
    }

    fn parent(&self) -> Cgroup {
        Cgroup {
            version: self.version,
            dirs: self
                .dirs
                .iter()
                .map(|(c, d)| (c.clone(), d.parent().unwrap_or(d).to_path_buf()))
                .collect(),
        }
    }

    fn child(&self, name: &str) -> Cgroup {
        Cgroup {
            version: self.version,
            dirs: self
                .dirs
                .iter()
                .map(|(c, d)| (c.clone(), d.join(name)))
                .collect(),
        }
    }

    /// The directories of this group, for messages and for `status`.
    pub fn display_path(&self) -> String {
        self.dirs
            .iter()
            .map(|(_, d)| d.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|(_, d)| d.exists())
    }

    pub fn create(&self) -> Result<()> {
        for (_, dir) in &self.dirs {
            match fs::create_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(CgroupError::Create {
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// Moves process `pid` (0: the caller) into this group.
    pub fn join(&self, pid: i32) -> Result<()> {
        for file in self.procs_files() {
            write_file(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// Applies memory and pids limits; `None` leaves a limit unset.
    pub fn set_limits(&self, memory_max: Option<u64>, pids_max: Option<u64>) -> Result<()> {
        for (controller, dir) in &self.dirs {
            let memory_file = match self.version {
                Version::V2 => "memory.max",
                Version::V1 => "memory.limit_in_bytes",
            };
            if let Some(bytes) = memory_max {
                if self.version == Version::V2 || controller == "memory" {
                    write_file(&dir.join(memory_file), &bytes.to_string())?;
                }
            }
            if let Some(n) = pids_max {
                if self.version == Version::V2 || controller == "pids" {
                    write_file(&dir.join("pids.max"), &n.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The pids controller's count of tasks (threads included), one
    /// consistent reading, unlike a union of `cgroup.procs` files.
    pub fn pids_current(&self) -> Option<u64> {
        let dir = match self.version {
            Version::V2 => &self.dirs[0].1,
            Version::V1 => &self.dirs.iter().find(|(c, _)| c == "pids")?.1,
        };
        fs::read_to_string(dir.join("pids.current"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// All pids in this group (and, on v1, in any controller's copy of it).
    pub fn pids(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for file in self.procs_files() {
            let text = match fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(source) => return Err(CgroupError::Read { path: file, source }),
            };
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        Ok(pids)
    }

    fn freezer_file(&self) -> Option<(PathBuf, &'static str, &'static str)> {
        match self.version {
            Version::V2 => Some((self.dirs[0].1.join("cgroup.freeze"), "1", "0")),
            Version::V1 => self
                .dirs
                .iter()
                .find(|(c, _)| c == "freezer")
                .map(|(_, d)| (d.join("freezer.state"), "FROZEN", "THAWED")),
        }
    }

    fn is_frozen(&self) -> Result<bool> {
        let read = |path: PathBuf| {
            fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })
        };
        match self.version {
            Version::V2 => Ok(read(self.dirs[0].1.join("cgroup.events"))?
                .lines()
                .any(|l| l.trim() == "frozen 1")),
            Version::V1 => {
                let (file, _, _) = self.freezer_file().ok_or(CgroupError::NoFreezer)?;
                Ok(read(file)?.trim() == "FROZEN")
            }
        }
    }

    /// Freezes every process in the group and waits until they all are.
    pub fn freeze(&self, timeout: Duration) -> Result<()> {
        let (file, frozen, _) = self.freezer_file().ok_or(CgroupError::NoFreezer)?;
        write_file(&file, frozen)?;
        let start = Instant::now();
        while !self.is_frozen()? {
            if start.elapsed() > timeout {
                let _ = self.thaw();
                return Err(CgroupError::FreezeTimeout {
                    path: file,
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    pub fn thaw(&self) -> Result<()> {
        let (file, _, thawed) = self.freezer_file().ok_or(CgroupError::NoFreezer)?;
        write_file(&file, thawed)
    }

    /// SIGKILLs every process in the group until it is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        // A frozen process does not die until thawed (hulld may have been
        // killed in the middle of a checkpoint).
        if self.exists() {
            let _ = self.thaw();
        }
        if self.version == Version::V2 {
            let kill_file = self.dirs[0].1.join("cgroup.kill");
            if kill_file.exists() {
                let _ = fs::write(&kill_file, "1");
            }
        }
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            let me = std::process::id() as i32;
            for pid in pids.into_iter().filter(|&p| p > 1 && p != me) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if start.elapsed() > timeout {
                return Err(CgroupError::KillTimeout {
                    path: self.dirs[0].1.clone(),
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Removes the group's directories; a group that is already gone is fine.
    /// Retries briefly because the kernel frees a cgroup a moment after its
    /// last process has been reaped.
    pub fn remove(&self) -> Result<()> {
        for (_, dir) in &self.dirs {
            let start = Instant::now();
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && start.elapsed() < Duration::from_secs(2) =>
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(source) => {
                        return Err(CgroupError::Remove {
                            path: dir.clone(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::base_below;
    use std::path::PathBuf;

    #[test]
    fn base_is_found_again_from_inside_the_daemon_group() {
        assert_eq!(base_below("/", "hull"), PathBuf::from("hull"));
        assert_eq!(base_below("/a/b", "hull"), PathBuf::from("a/b/hull"));
        assert_eq!(
            base_below("/a/b/hull/daemon", "hull"),
            PathBuf::from("a/b/hull")
        );
        assert_eq!(
            base_below("/a/other/daemon", "hull"),
            PathBuf::from("a/other/daemon/hull")
        );
    }
}
