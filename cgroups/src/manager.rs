//! The one interface both cgroup versions implement.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{CgroupError, Result};
use crate::fs;

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

/// A group's CPU share and cap. `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuLimits {
    /// The group's share of contended CPU against its siblings, in v2's
    /// unit: 1..=10000, 100 being the kernel's default. v1 gets
    /// `cpu.shares = weight * 1024 / 100`, which keeps v1's default (1024)
    /// and the ratios between siblings, the only thing a share means.
    pub weight: Option<u64>,
    /// A hard cap on CPU time, whether or not other groups want the CPU.
    pub max: Option<CpuMax>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMax {
    Unlimited,
    /// At most `quota` of CPU time in every `period` (quota > period means
    /// more than one CPU).
    Quota {
        quota: Duration,
        period: Duration,
    },
}

impl CpuMax {
    /// The scheduler's default period.
    pub const PERIOD: Duration = Duration::from_millis(100);

    /// A cap of `cpus` CPUs' worth of time (1.5: one and a half CPUs).
    pub fn cpus(cpus: f64) -> CpuMax {
        CpuMax::Quota {
            quota: Self::PERIOD.mul_f64(cpus.max(0.0)),
            period: Self::PERIOD,
        }
    }

    /// (quota, period) in microseconds, quota `None` when unlimited,
    /// checked against the kernel's bounds so that a bad value fails here,
    /// with both numbers, rather than as EINVAL from a write.
    pub(crate) fn micros(&self) -> Result<(Option<u64>, u64)> {
        match *self {
            CpuMax::Unlimited => Ok((None, micros(Self::PERIOD))),
            CpuMax::Quota { quota, period } => {
                let ok = (Duration::from_millis(1)..=Duration::from_secs(1)).contains(&period)
                    && quota >= Duration::from_millis(1);
                if !ok {
                    return Err(CgroupError::CpuQuota { quota, period });
                }
                Ok((Some(micros(quota)), micros(period)))
            }
        }
    }
}

pub(crate) fn check_weight(weight: u64) -> Result<u64> {
    if (1..=10_000).contains(&weight) {
        Ok(weight)
    } else {
        Err(CgroupError::CpuWeight { weight })
    }
}

/// What hull does with one cgroup, whichever version holds it.
///
/// Every method is synchronous and may block: `freeze` and `kill_all` wait
/// for the kernel (up to their timeouts) and `remove` retries while the
/// kernel frees the group. Async callers run them with
/// `tokio::task::spawn_blocking`, never on a runtime worker.
pub trait CgroupManager: std::fmt::Debug + Send + Sync {
    fn version(&self) -> Version;

    /// The group's directories: one on v2, one per controller on v1.
    fn dirs(&self) -> Vec<&Path>;

    fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }

    /// Creates the group (and missing parents); an existing one is fine.
    fn create(&self) -> Result<()> {
        for dir in self.dirs() {
            fs::create_dir(dir).map_err(|source| CgroupError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid to in order to join.
    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().iter().map(|d| d.join(fs::PROCS)).collect()
    }

    /// Moves process `pid` (0: the caller) into this group.
    fn join(&self, pid: i32) -> Result<()> {
        for path in self.procs_files() {
            fs::write(&path, &pid.to_string()).map_err(|source| CgroupError::Join {
                path,
                pid,
                source,
            })?;
        }
        Ok(())
    }

    /// The group's own members (and, on v1, those of any controller's copy
    /// of it), without the groups below it.
    fn pids(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for dir in self.dirs() {
            let found = fs::procs(dir).map_err(|source| CgroupError::ReadProcs {
                path: dir.join(fs::PROCS),
                source,
            })?;
            for pid in found {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        Ok(pids)
    }

    /// Removes the group and any groups below it; one that is gone is fine.
    /// The group must be empty (see [`CgroupManager::kill_all`]).
    fn remove(&self) -> Result<()> {
        for dir in self.dirs() {
            fs::remove_tree(dir).map_err(|(path, source)| CgroupError::Remove { path, source })?;
        }
        Ok(())
    }

    /// Applies memory and pids limits; `None` leaves a limit as it is. On v1
    /// a limit whose controller the host lacks is not applied (the group
    /// then has only the controllers that exist).
    fn set_limits(&self, memory_max: Option<u64>, pids_max: Option<u64>) -> Result<()>;

    /// Applies a CPU weight and cap; fails with `NoController` where the
    /// group has no cpu controller.
    fn set_cpu(&self, cpu: &CpuLimits) -> Result<()>;

    /// The pids controller's count of tasks (threads included), one
    /// consistent reading, unlike a union of `cgroup.procs` files.
    fn pids_current(&self) -> Option<u64>;

    /// How many processes the OOM killer has killed in this group (v2:
    /// `memory.events`, which counts the groups below too; v1:
    /// `memory.oom_control`, kernel 4.13 and later). `None` where there is
    /// no memory controller or the kernel does not count.
    fn oom_kills(&self) -> Option<u64>;

    /// Freezes every process in the group and waits until they all are; on
    /// timeout the group is thawed again.
    fn freeze(&self, timeout: Duration) -> Result<()>;

    fn thaw(&self) -> Result<()>;

    /// Kills every process in the group and the groups below it, and waits
    /// until the group is empty. A group that does not exist is empty. The
    /// group is left thawed, so whatever joins it next runs.
    fn kill_all(&self, timeout: Duration) -> Result<()>;
}

/// Microseconds, saturating (a cgroup takes no period of 584,000 years).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Asks `m`, a group without a cpu controller, for a CPU weight.
    pub(crate) fn assert_no_cpu(m: &dyn CgroupManager) -> CgroupError {
        let err = m
            .set_cpu(&CpuLimits {
                weight: Some(100),
                max: None,
            })
            .unwrap_err();
        let named = matches!(
            err,
            CgroupError::NoController {
                controller: "cpu",
                ..
            }
        );
        assert!(named, "{err}");
        err
    }

    #[test]
    fn cpu_caps_are_checked_before_anything_is_written() {
        assert_eq!(
            CpuMax::cpus(1.5).micros().unwrap(),
            (Some(150_000), 100_000)
        );
        assert_eq!(CpuMax::Unlimited.micros().unwrap(), (None, 100_000));
        let tiny = CpuMax::cpus(0.001);
        assert!(matches!(tiny.micros(), Err(CgroupError::CpuQuota { .. })));
        let long = CpuMax::Quota {
            quota: Duration::from_secs(1),
            period: Duration::from_secs(2),
        };
        assert!(long.micros().is_err());
        assert!(check_weight(0).is_err());
        assert!(check_weight(10_001).is_err());
        assert_eq!(check_weight(100).unwrap(), 100);
    }
}
