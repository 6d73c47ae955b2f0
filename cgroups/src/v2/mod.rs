//! cgroup v2: one directory per group in the unified hierarchy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{CgroupError, Result};
use crate::fs;
use crate::manager::{check_weight, CgroupManager, CpuLimits, Version};

/// Controllers a hull group needs enabled from its parent.
const REQUIRED: [&str; 2] = ["memory", "pids"];
/// The files a delegated group's new owner gets (cgroup-v2.rst,
/// "Delegation Containment"; what systemd chowns for `Delegate=yes`).
const DELEGATED_FILES: [&str; 3] = ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"];
/// How many groups a delegated group may hold below it, and how deep.
pub const DELEGATED_BOUNDS: [(&str, u32); 2] =
    [("cgroup.max.descendants", 256), ("cgroup.max.depth", 8)];

fn remove_below(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_tree(&entry.path())
                .map_err(|(path, source)| CgroupError::RemoveChild { path, source })?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manager {
    dir: PathBuf,
}

impl Manager {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Manager { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn child(&self, name: &str) -> Self {
        Manager::new(self.dir.join(name))
    }

    pub fn parent(&self) -> Self {
        Manager::new(self.dir.parent().unwrap_or(&self.dir))
    }

    /// Lets this group's children use the memory and pids controllers (and
    /// cpu, where the kernel agrees). cpu is asked for on its own and its
    /// refusal is not an error: the kernel refuses it while a real-time
    /// task sits in a non-root group, and a group without it still works;
    /// only `set_cpu` then says so.
    pub fn enable_controllers(&self) -> Result<()> {
        let available =
            std::fs::read_to_string(self.dir.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| available.split_whitespace().any(|a| a == c);
        let path = self.dir.join("cgroup.subtree_control");
        let wanted: Vec<String> = REQUIRED
            .iter()
            .filter(|c| has(c))
            .map(|c| format!("+{c}"))
            .collect();
        if !wanted.is_empty() {
            let controllers = wanted.join(" ");
            fs::write(&path, &controllers).map_err(|source| CgroupError::EnableControllers {
                path: path.clone(),
                controllers,
                source,
            })?;
        }
        if has("cpu") {
            let _ = fs::write(&path, "+cpu");
        }
        Ok(())
    }

    /// Hands the group to the inner's root, `uid`/`gid` in the VM, as
    /// systemd's `Delegate=` hands one to a user: the directory (to make
    /// child groups) and the files that move processes and enable
    /// controllers below it. Its limits stay root's, and with nsdelegate
    /// the kernel refuses writes to them from inside the inner's cgroup
    /// namespace anyway.
    pub fn delegate(&self, uid: u32, gid: u32) -> Result<()> {
        // Groups the inner may make below its own: each costs kernel
        // memory, and these files, like the limits, are out of its reach.
        for (file, max) in DELEGATED_BOUNDS {
            let path = self.dir.join(file);
            fs::write(&path, &max.to_string()).map_err(|source| CgroupError::Delegate {
                path,
                uid,
                source,
            })?;
        }
        let files = std::iter::once(self.dir.clone())
            .chain(DELEGATED_FILES.iter().map(|f| self.dir.join(f)));
        for path in files {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|source| CgroupError::Delegate { path, uid, source })?;
        }
        Ok(())
    }

    fn set(&self, file: &str, controller: &'static str, value: &str) -> Result<()> {
        let path = self.dir.join(file);
        fs::write(&path, value).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound && self.dir.exists() {
                CgroupError::NoController {
                    path: self.dir.clone(),
                    controller,
                }
            } else {
                CgroupError::SetLimit {
                    path,
                    value: value.to_string(),
                    source,
                }
            }
        })
    }

    fn events(&self) -> PathBuf {
        self.dir.join("cgroup.events")
    }
}

impl CgroupManager for Manager {
    fn version(&self) -> Version {
        Version::V2
    }

    fn dirs(&self) -> Vec<&Path> {
        vec![&self.dir]
    }

    fn set_limits(&self, memory_max: Option<u64>, pids_max: Option<u64>) -> Result<()> {
        if let Some(bytes) = memory_max {
            self.set("memory.max", "memory", &bytes.to_string())?;
        }
        if let Some(n) = pids_max {
            self.set("pids.max", "pids", &n.to_string())?;
        }
        Ok(())
    }

    fn set_cpu(&self, cpu: &CpuLimits) -> Result<()> {
        if let Some(weight) = cpu.weight {
            self.set("cpu.weight", "cpu", &check_weight(weight)?.to_string())?;
        }
        if let Some(max) = cpu.max {
            let (quota, period) = max.micros()?;
            let quota = quota.map_or("max".to_string(), |q| q.to_string());
            self.set("cpu.max", "cpu", &format!("{quota} {period}"))?;
        }
        Ok(())
    }

    fn pids_current(&self) -> Option<u64> {
        fs::read_u64(&self.dir.join("pids.current"))
    }

    fn oom_kills(&self) -> Option<u64> {
        fs::read_keyed(&self.dir.join("memory.events"), "oom_kill")
    }

    fn freeze(&self, timeout: Duration) -> Result<()> {
        let path = self.dir.join("cgroup.freeze");
        fs::write(&path, "1").map_err(|source| CgroupError::Freeze {
            path: path.clone(),
            source,
        })?;
        let events = self.events();
        match fs::wait_keyed(&events, "frozen", 1, timeout) {
            Ok(true) => Ok(()),
            Ok(false) => {
                let _ = self.thaw();
                Err(CgroupError::FreezeTimeout {
                    path,
                    waited: timeout,
                })
            }
            Err(source) => {
                let _ = self.thaw();
                Err(CgroupError::FreezerState {
                    path: events,
                    source,
                })
            }
        }
    }

    fn thaw(&self) -> Result<()> {
        let path = self.dir.join("cgroup.freeze");
        fs::write(&path, "0").map_err(|source| CgroupError::Thaw { path, source })
    }

    /// cgroup.kill (Linux 5.14) kills the whole subtree in the kernel, with
    /// no race against forks; older kernels get a SIGKILL for every pid,
    /// repeated while the group is populated. Either way the wait is a
    /// poll(2) on cgroup.events until `populated 0`.
    fn kill_all(&self, timeout: Duration) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        // A frozen v2 task dies of SIGKILL anyway, but a group left frozen
        // (hulld killed during a checkpoint) would freeze the next inner.
        let _ = self.thaw();
        let kill_file = self.dir.join("cgroup.kill");
        let in_kernel = match fs::write(&kill_file, "1") {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(source) => {
                return Err(CgroupError::Kill {
                    path: kill_file,
                    source,
                })
            }
        };
        let events = self.events();
        let deadline = Instant::now() + timeout;
        loop {
            if !in_kernel {
                let pids = fs::subtree_procs(&self.dir)
                    .map_err(|(path, source)| CgroupError::ReadProcs { path, source })?;
                fs::sigkill(&pids);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = if in_kernel {
                left
            } else {
                left.min(Duration::from_millis(20))
            };
            let empty = fs::wait_keyed(&events, "populated", 0, slice).map_err(|source| {
                CgroupError::WaitEmpty {
                    path: events.clone(),
                    source,
                }
            })?;
            if empty {
                // What the inner made below its group goes with it: the
                // next inner starts from hull's group alone.
                return remove_below(&self.dir);
            }
            if Instant::now() >= deadline {
                let left = fs::subtree_procs(&self.dir).map_or(0, |p| p.len());
                return Err(CgroupError::KillTimeout {
                    path: self.dir.clone(),
                    left,
                    waited: timeout,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::CpuMax;
    use std::fs::{read_to_string, write};

    /// A directory laid out like a v2 group with the given control files.
    fn group(files: &[(&str, &str)]) -> (tempfile::TempDir, Manager) {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            write(dir.path().join(name), content).unwrap();
        }
        let m = Manager::new(dir.path());
        (dir, m)
    }

    #[test]
    fn a_delegated_group_is_bounded_and_handed_over() {
        let (dir, m) = group(&[
            ("cgroup.procs", ""),
            ("cgroup.threads", ""),
            ("cgroup.subtree_control", ""),
            ("cgroup.max.descendants", "max\n"),
            ("cgroup.max.depth", "max\n"),
        ]);
        let me = nix::unistd::getuid().as_raw();
        m.delegate(me, nix::unistd::getgid().as_raw()).unwrap();
        assert_eq!(
            read_to_string(dir.path().join("cgroup.max.descendants")).unwrap(),
            "256"
        );
        assert_eq!(
            read_to_string(dir.path().join("cgroup.max.depth")).unwrap(),
            "8"
        );
    }

    #[test]
    fn limits_go_to_the_unified_files() {
        let (dir, m) = group(&[("memory.max", "max\n"), ("pids.max", "max\n")]);
        m.set_limits(Some(1 << 30), Some(512)).unwrap();
        assert_eq!(
            read_to_string(dir.path().join("memory.max")).unwrap(),
            "1073741824"
        );
        assert_eq!(read_to_string(dir.path().join("pids.max")).unwrap(), "512");
        m.set_limits(None, None).unwrap();
        assert_eq!(read_to_string(dir.path().join("pids.max")).unwrap(), "512");
    }

    #[test]
    fn cpu_weight_and_max() {
        let (dir, m) = group(&[("cpu.weight", "100\n"), ("cpu.max", "max 100000\n")]);
        m.set_cpu(&CpuLimits {
            weight: Some(50),
            max: Some(CpuMax::cpus(0.5)),
        })
        .unwrap();
        assert_eq!(read_to_string(dir.path().join("cpu.weight")).unwrap(), "50");
        assert_eq!(
            read_to_string(dir.path().join("cpu.max")).unwrap(),
            "50000 100000"
        );
        m.set_cpu(&CpuLimits {
            weight: None,
            max: Some(CpuMax::Unlimited),
        })
        .unwrap();
        assert_eq!(
            read_to_string(dir.path().join("cpu.max")).unwrap(),
            "max 100000"
        );
        let bad = m.set_cpu(&CpuLimits {
            weight: Some(0),
            max: None,
        });
        assert!(matches!(bad, Err(CgroupError::CpuWeight { weight: 0 })));
    }

    #[test]
    fn a_missing_controller_is_named() {
        let (_dir, m) = group(&[]);
        let err = crate::manager::tests::assert_no_cpu(&m);
        assert!(err.to_string().contains(&m.dir().display().to_string()));
        assert!(m.pids_current().is_none());
        assert!(m.oom_kills().is_none());
    }

    #[test]
    fn counters_are_read() {
        let (_dir, m) = group(&[
            ("pids.current", "7\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n",
            ),
        ]);
        assert_eq!(m.pids_current(), Some(7));
        assert_eq!(m.oom_kills(), Some(2));
    }

    #[test]
    fn controllers_are_enabled_for_the_children() {
        let (dir, m) = group(&[
            ("cgroup.controllers", "cpuset cpu io memory pids\n"),
            ("cgroup.subtree_control", ""),
        ]);
        m.enable_controllers().unwrap();
        // A plain file keeps only the last write; cgroupfs would add up.
        assert_eq!(
            read_to_string(dir.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu"
        );
        let (dir, m) = group(&[("cgroup.controllers", "io\n")]);
        m.enable_controllers().unwrap();
        assert!(!dir.path().join("cgroup.subtree_control").exists());
    }

    #[test]
    fn freeze_waits_for_frozen_and_thaws_on_timeout() {
        let (dir, m) = group(&[
            ("cgroup.freeze", "0\n"),
            ("cgroup.events", "populated 1\nfrozen 1\n"),
        ]);
        m.freeze(Duration::from_secs(5)).unwrap();
        assert_eq!(
            read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
            "1"
        );
        write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let err = m.freeze(Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, CgroupError::FreezeTimeout { .. }), "{err}");
        assert_eq!(
            read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
            "0"
        );
    }

    #[test]
    fn kill_uses_cgroup_kill_and_waits_for_unpopulated() {
        let (dir, m) = group(&[
            ("cgroup.kill", ""),
            ("cgroup.freeze", "1\n"),
            ("cgroup.procs", ""),
            ("cgroup.events", "populated 0\nfrozen 0\n"),
        ]);
        m.kill_all(Duration::from_secs(5)).unwrap();
        assert_eq!(read_to_string(dir.path().join("cgroup.kill")).unwrap(), "1");
        assert_eq!(
            read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
            "0"
        );

        write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let err = m.kill_all(Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, CgroupError::KillTimeout { .. }), "{err}");
    }

    #[test]
    fn a_group_that_does_not_exist_is_already_empty() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manager::new(dir.path().join("gone"));
        m.kill_all(Duration::from_millis(10)).unwrap();
        assert!(m.pids().unwrap().is_empty());
        m.remove().unwrap();
    }
}
