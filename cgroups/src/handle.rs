//! The handle callers hold: one logical group, whichever version holds it.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::Result;
use crate::manager::{CgroupManager, CpuLimits, Version};
use crate::{v1, v2};

/// One logical cgroup: a single directory on v2, one per controller on v1.
/// Cheap to clone; holds paths, no open files.
///
/// Every method is synchronous; `freeze`, `kill_all` and `remove` block for
/// up to their timeouts, so async code calls them through
/// `tokio::task::spawn_blocking`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup(Manager);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Manager {
    V1(v1::Manager),
    V2(v2::Manager),
}

impl From<v1::Manager> for Cgroup {
    fn from(m: v1::Manager) -> Self {
        Cgroup(Manager::V1(m))
    }
}

impl From<v2::Manager> for Cgroup {
    fn from(m: v2::Manager) -> Self {
        Cgroup(Manager::V2(m))
    }
}

impl Cgroup {
    /// The version's implementation, for what the handle does not wrap.
    pub fn manager(&self) -> &dyn CgroupManager {
        match &self.0 {
            Manager::V1(m) => m,
            Manager::V2(m) => m,
        }
    }

    pub fn version(&self) -> Version {
        self.manager().version()
    }

    pub(crate) fn child(&self, name: &str) -> Cgroup {
        match &self.0 {
            Manager::V1(m) => m.child(name).into(),
            Manager::V2(m) => m.child(name).into(),
        }
    }

    pub(crate) fn parent(&self) -> Cgroup {
        match &self.0 {
            Manager::V1(m) => m.parent().into(),
            Manager::V2(m) => m.parent().into(),
        }
    }

    pub(crate) fn as_v2(&self) -> Option<&v2::Manager> {
        match &self.0 {
            Manager::V2(m) => Some(m),
            Manager::V1(_) => None,
        }
    }

    /// How a cgroup namespace rooted at this group mounts it: `None` on
    /// v2 (the one unified hierarchy), else each v1 hierarchy the group
    /// is in, as its mount options (`memory`, `cpu,cpuacct`).
    pub fn v1_hierarchies(&self) -> Result<Option<Vec<String>>> {
        let Manager::V1(m) = &self.0 else {
            return Ok(None);
        };
        let own = crate::hull::read_own()?;
        let controllers: Vec<&str> = m.controllers().collect();
        Ok(Some(crate::hull::hierarchies(&own, &controllers)))
    }

    /// The directories of this group, for messages and for `status`.
    pub fn display_path(&self) -> String {
        self.manager()
            .dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn exists(&self) -> bool {
        self.manager().exists()
    }

    pub fn create(&self) -> Result<()> {
        self.manager().create()
    }

    /// The `cgroup.procs` files a process writes its pid to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.manager().procs_files()
    }

    /// Moves process `pid` (0: the caller) into this group.
    pub fn join(&self, pid: i32) -> Result<()> {
        self.manager().join(pid)
    }

    /// Applies memory and pids limits; `None` leaves a limit unset.
    pub fn set_limits(&self, memory_max: Option<u64>, pids_max: Option<u64>) -> Result<()> {
        self.manager().set_limits(memory_max, pids_max)
    }

    /// Applies a CPU weight and cap (see [`CpuLimits`]).
    pub fn set_cpu(&self, cpu: &CpuLimits) -> Result<()> {
        self.manager().set_cpu(cpu)
    }

    /// The pids controller's count of tasks, threads included.
    pub fn pids_current(&self) -> Option<u64> {
        self.manager().pids_current()
    }

    /// Processes the OOM killer has killed in this group, where the kernel counts.
    pub fn oom_kills(&self) -> Option<u64> {
        self.manager().oom_kills()
    }

    /// A registration for this group's OOM notifications (see
    /// [`OomWatch`]); the group must exist and have a memory controller.
    pub fn watch_oom(&self) -> Result<crate::OomWatch> {
        match &self.0 {
            Manager::V2(m) => crate::OomWatch::v2(m.dir()),
            Manager::V1(m) => match m.controller_dir("memory") {
                Some(dir) => crate::OomWatch::v1(dir),
                None => Err(crate::CgroupError::NoController {
                    path: self
                        .manager()
                        .dirs()
                        .first()
                        .map(|d| d.to_path_buf())
                        .unwrap_or_default(),
                    controller: "memory",
                }),
            },
        }
    }

    /// All pids in this group (and, on v1, in any controller's copy of it).
    pub fn pids(&self) -> Result<Vec<i32>> {
        self.manager().pids()
    }

    /// Freezes every process in the group and waits until they all are.
    pub fn freeze(&self, timeout: Duration) -> Result<()> {
        self.manager().freeze(timeout)
    }

    pub fn thaw(&self) -> Result<()> {
        self.manager().thaw()
    }

    /// Kills every process in the group and waits until it is empty.
    /// Blocking: from async code, through `spawn_blocking`.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        self.manager().kill_all(timeout)
    }

    /// Hands the group to the inner's root (see [`v2::Manager::delegate`]);
    /// nothing on v1, where the inner sees its groups read-only.
    pub fn delegate(&self, uid: u32, gid: u32) -> Result<()> {
        match self.as_v2() {
            Some(m) => m.delegate(uid, gid),
            None => Ok(()),
        }
    }

    /// Removes the group's directories; a group that is already gone is fine.
    pub fn remove(&self) -> Result<()> {
        self.manager().remove()
    }
}
