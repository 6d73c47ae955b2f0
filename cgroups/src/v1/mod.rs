//! cgroup v1: one directory per controller for every group, each in that
//! controller's own hierarchy (a hybrid host has these beside an empty v2
//! tree).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{CgroupError, Result};
use crate::fs;
use crate::manager::{check_weight, CgroupManager, CpuLimits, Version};

/// The v1 controllers hull uses; any of them may be missing on a host.
pub const CONTROLLERS: [&str; 4] = ["memory", "pids", "freezer", "cpu"];

const STATE: &str = "freezer.state";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manager {
    /// (controller, directory), one per controller the host has.
    dirs: Vec<(String, PathBuf)>,
}

impl Manager {
    pub fn new(dirs: Vec<(String, PathBuf)>) -> Self {
        Manager { dirs }
    }

    pub fn child(&self, name: &str) -> Self {
        Manager::new(
            self.dirs
                .iter()
                .map(|(c, d)| (c.clone(), d.join(name)))
                .collect(),
        )
    }

    pub fn parent(&self) -> Self {
        Manager::new(
            self.dirs
                .iter()
                .map(|(c, d)| (c.clone(), d.parent().unwrap_or(d).to_path_buf()))
                .collect(),
        )
    }

    /// The controllers the group has a directory for.
    pub fn controllers(&self) -> impl Iterator<Item = &str> {
        self.dirs.iter().map(|(c, _)| c.as_str())
    }

    /// The group's directory in `controller`'s hierarchy.
    pub fn controller_dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, d)| d.as_path())
    }

    /// The first of the group's directories, to name the group in errors.
    fn name_dir(&self) -> PathBuf {
        self.dirs
            .first()
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    }

    fn require(&self, controller: &'static str) -> Result<&Path> {
        self.controller_dir(controller)
            .ok_or_else(|| CgroupError::NoController {
                path: self.name_dir(),
                controller,
            })
    }

    fn set(dir: &Path, file: &str, value: &str) -> Result<()> {
        let path = dir.join(file);
        fs::write(&path, value).map_err(|source| CgroupError::SetLimit {
            path,
            value: value.to_string(),
            source,
        })
    }

    fn freezer_state(&self) -> Result<PathBuf> {
        self.controller_dir("freezer")
            .map(|d| d.join(STATE))
            .ok_or_else(|| CgroupError::NoFreezer {
                path: self.name_dir(),
            })
    }

    /// Asks the freezer to freeze and waits up to `timeout` for FROZEN
    /// (FREEZING until every task has stopped); returns whether it got there.
    fn freeze_within(state: &Path, timeout: Duration) -> Result<bool> {
        fs::write(state, "FROZEN").map_err(|source| CgroupError::Freeze {
            path: state.to_path_buf(),
            source,
        })?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(100);
        loop {
            let now =
                std::fs::read_to_string(state).map_err(|source| CgroupError::FreezerState {
                    path: state.to_path_buf(),
                    source,
                })?;
            if now.trim() == "FROZEN" {
                return Ok(true);
            }
            if start.elapsed() >= timeout {
                return Ok(false);
            }
            // v1's freezer has no notification; back off up to 2 ms.
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Every pid in the group's subtree in every controller's hierarchy.
    fn all_pids(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for (_, dir) in &self.dirs {
            for pid in fs::subtree_procs(dir)
                .map_err(|(path, source)| CgroupError::ReadProcs { path, source })?
            {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        Ok(pids)
    }
}

/// v2's weight in v1's unit; see [`CpuLimits::weight`]. The kernel takes
/// 2..=262144.
fn shares(weight: u64) -> u64 {
    (weight * 1024 / 100).clamp(2, 262_144)
}

impl CgroupManager for Manager {
    fn version(&self) -> Version {
        Version::V1
    }

    fn dirs(&self) -> Vec<&Path> {
        self.dirs.iter().map(|(_, d)| d.as_path()).collect()
    }

    fn set_limits(&self, memory_max: Option<u64>, pids_max: Option<u64>) -> Result<()> {
        if let (Some(bytes), Some(dir)) = (memory_max, self.controller_dir("memory")) {
            Self::set(dir, "memory.limit_in_bytes", &bytes.to_string())?;
        }
        if let (Some(n), Some(dir)) = (pids_max, self.controller_dir("pids")) {
            Self::set(dir, "pids.max", &n.to_string())?;
        }
        Ok(())
    }

    fn set_cpu(&self, cpu: &CpuLimits) -> Result<()> {
        if cpu.weight.is_none() && cpu.max.is_none() {
            return Ok(());
        }
        let dir = self.require("cpu")?;
        if let Some(weight) = cpu.weight {
            Self::set(
                dir,
                "cpu.shares",
                &shares(check_weight(weight)?).to_string(),
            )?;
        }
        if let Some(max) = cpu.max {
            let (quota, period) = max.micros()?;
            // Quota -1 first: a new period is checked against the quota in
            // force, which a shorter period could fall below.
            Self::set(dir, "cpu.cfs_quota_us", "-1")?;
            Self::set(dir, "cpu.cfs_period_us", &period.to_string())?;
            if let Some(quota) = quota {
                Self::set(dir, "cpu.cfs_quota_us", &quota.to_string())?;
            }
        }
        Ok(())
    }

    fn pids_current(&self) -> Option<u64> {
        fs::read_u64(&self.controller_dir("pids")?.join("pids.current"))
    }

    fn oom_kills(&self) -> Option<u64> {
        fs::read_keyed(
            &self.controller_dir("memory")?.join("memory.oom_control"),
            "oom_kill",
        )
    }

    fn freeze(&self, timeout: Duration) -> Result<()> {
        let state = self.freezer_state()?;
        if Self::freeze_within(&state, timeout)? {
            return Ok(());
        }
        let _ = self.thaw();
        Err(CgroupError::FreezeTimeout {
            path: state,
            waited: timeout,
        })
    }

    fn thaw(&self) -> Result<()> {
        let state = self.freezer_state()?;
        fs::write(&state, "THAWED").map_err(|source| CgroupError::Thaw {
            path: state,
            source,
        })
    }

    /// v1 has no cgroup.kill: freeze the group so nothing forks while the
    /// pids are read, SIGKILL them all, thaw (a frozen task does not die
    /// until it runs), then check for empty in short sleeps (v1 has no
    /// event to wait on). A round that leaves processes (one stuck in the
    /// kernel and not frozen in time) is repeated until the timeout.
    fn kill_all(&self, timeout: Duration) -> Result<()> {
        if !self.exists() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let state = self.freezer_state().ok().filter(|s| s.exists());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(state) = &state {
                // Not frozen in time: kill what is there all the same.
                Self::freeze_within(state, left.min(Duration::from_millis(100)))?;
            }
            let pids = self.all_pids()?;
            fs::sigkill(&pids);
            if state.is_some() {
                self.thaw()?;
            }
            if pids.is_empty() {
                return Ok(());
            }
            let round = Instant::now();
            let mut pause = Duration::from_micros(200);
            loop {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
                let pids = self.all_pids()?;
                if pids.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(CgroupError::KillTimeout {
                        path: self.name_dir(),
                        left: pids.len(),
                        waited: timeout,
                    });
                }
                if round.elapsed() >= Duration::from_millis(200) {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::CpuMax;
    use std::fs::{create_dir_all, read_to_string, write};

    /// A temp dir laid out like a hybrid host's v1 mounts, with a group `g`
    /// in each of `controllers` holding the given control files.
    fn group(controllers: &[&str], files: &[(&str, &str)]) -> (tempfile::TempDir, Manager) {
        let root = tempfile::tempdir().unwrap();
        let mut dirs = Vec::new();
        for c in controllers {
            let dir = root.path().join(c).join("g");
            create_dir_all(&dir).unwrap();
            write(dir.join("cgroup.procs"), "").unwrap();
            for (name, content) in files {
                if name.starts_with(c) {
                    write(dir.join(name), content).unwrap();
                }
            }
            dirs.push((c.to_string(), dir));
        }
        (root, Manager::new(dirs))
    }

    fn read(root: &tempfile::TempDir, controller: &str, file: &str) -> String {
        read_to_string(root.path().join(controller).join("g").join(file)).unwrap()
    }

    #[test]
    fn limits_go_to_their_controllers_hierarchy() {
        let (root, m) = group(
            &["memory", "pids", "freezer"],
            &[
                ("memory.limit_in_bytes", "9223372036854771712\n"),
                ("pids.max", "max\n"),
            ],
        );
        m.set_limits(Some(1 << 30), Some(512)).unwrap();
        assert_eq!(read(&root, "memory", "memory.limit_in_bytes"), "1073741824");
        assert_eq!(read(&root, "pids", "pids.max"), "512");
    }

    #[test]
    fn a_missing_controller_leaves_its_limit_unset() {
        let (root, m) = group(&["memory"], &[("memory.limit_in_bytes", "0\n")]);
        m.set_limits(Some(4096), Some(10)).unwrap();
        assert_eq!(read(&root, "memory", "memory.limit_in_bytes"), "4096");
        assert!(m.pids_current().is_none());
        crate::manager::tests::assert_no_cpu(&m);
        assert!(matches!(
            m.freeze(Duration::from_secs(1)),
            Err(CgroupError::NoFreezer { .. })
        ));
    }

    #[test]
    fn cpu_weight_becomes_shares_and_max_becomes_cfs_quota() {
        let files = [
            ("cpu.shares", "1024\n"),
            ("cpu.cfs_quota_us", "-1\n"),
            ("cpu.cfs_period_us", "100000\n"),
        ];
        let (root, m) = group(&["cpu"], &files);
        m.set_cpu(&CpuLimits {
            weight: Some(100),
            max: Some(CpuMax::Quota {
                quota: Duration::from_millis(25),
                period: Duration::from_millis(50),
            }),
        })
        .unwrap();
        assert_eq!(read(&root, "cpu", "cpu.shares"), "1024");
        assert_eq!(read(&root, "cpu", "cpu.cfs_period_us"), "50000");
        assert_eq!(read(&root, "cpu", "cpu.cfs_quota_us"), "25000");
        m.set_cpu(&CpuLimits {
            weight: Some(1),
            max: Some(CpuMax::Unlimited),
        })
        .unwrap();
        assert_eq!(read(&root, "cpu", "cpu.shares"), "10");
        assert_eq!(read(&root, "cpu", "cpu.cfs_quota_us"), "-1");
        assert_eq!(shares(10_000), 102_400);
        assert_eq!(shares(1), 10);
    }

    #[test]
    fn oom_kills_come_from_oom_control() {
        let (_root, m) = group(
            &["memory", "pids"],
            &[
                (
                    "memory.oom_control",
                    "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
                ),
                ("pids.current", "12\n"),
            ],
        );
        assert_eq!(m.oom_kills(), Some(3));
        assert_eq!(m.pids_current(), Some(12));
    }

    #[test]
    fn freeze_waits_for_frozen_and_thaws_on_timeout() {
        let (root, m) = group(&["freezer"], &[("freezer.state", "THAWED\n")]);
        // A plain file reads back what was written, so FROZEN comes at once.
        m.freeze(Duration::from_secs(1)).unwrap();
        assert_eq!(read(&root, "freezer", STATE), "FROZEN");
        m.thaw().unwrap();
        assert_eq!(read(&root, "freezer", STATE), "THAWED");
    }

    #[test]
    fn kill_of_an_empty_group_thaws_it() {
        let (root, m) = group(&["memory", "freezer"], &[("freezer.state", "FROZEN\n")]);
        m.kill_all(Duration::from_secs(1)).unwrap();
        assert_eq!(read(&root, "freezer", STATE), "THAWED");
    }

    #[test]
    fn pids_are_the_union_of_every_controllers_copy() {
        let (root, m) = group(&["memory", "pids"], &[]);
        write(root.path().join("memory/g/cgroup.procs"), "10\n11\n").unwrap();
        write(root.path().join("pids/g/cgroup.procs"), "11\n12\n").unwrap();
        assert_eq!(m.pids().unwrap(), vec![10, 11, 12]);
        assert_eq!(m.procs_files().len(), 2);
        let child = m.child("inner");
        assert_eq!(child.parent(), m);
        assert_eq!(
            child.controller_dir("pids").unwrap(),
            root.path().join("pids/g/inner")
        );
    }
}
