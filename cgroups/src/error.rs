//! One error variant per step, each naming the file or directory it failed
//! on. The I/O error is the `source`, not part of the message, so a chain
//! printer shows it once.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read the cgroup hulld runs in from {path}")]
    ReadOwn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch for out-of-memory kills through {path}")]
    WatchOom {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup hierarchy with a memory or pids controller is mounted under {root}")]
    NoHierarchy { root: PathBuf },
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enable the controllers {controllers:?} for the children of {path}")]
    EnableControllers {
        path: PathBuf,
        controllers: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot move process {pid} into the cgroup through {path}")]
    Join {
        path: PathBuf,
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("cannot move process {pid} out of {group}, which must hold no process once its children have controllers, through {path}")]
    MoveToLeaf {
        pid: i32,
        group: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the limit {value:?} in {path}")]
    SetLimit {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} has no {controller} controller")]
    NoController {
        path: PathBuf,
        controller: &'static str,
    },
    #[error("CPU weight {weight} is outside 1..=10000")]
    CpuWeight { weight: u64 },
    #[error("CPU quota {quota:?} per period {period:?} is outside what the kernel takes (period 1 ms..=1 s, quota at least 1 ms)")]
    CpuQuota { quota: Duration, period: Duration },
    #[error("cannot read the processes of the cgroup from {path}")]
    ReadProcs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no freezer for cgroup {path}: neither cgroup v2 nor the v1 freezer controller")]
    NoFreezer { path: PathBuf },
    #[error("cannot freeze the cgroup through {path}")]
    Freeze {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the freezer state from {path}")]
    FreezerState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the processes in {path} did not freeze within {waited:?}")]
    FreezeTimeout { path: PathBuf, waited: Duration },
    #[error("cannot thaw the cgroup through {path}")]
    Thaw {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot hand {path} to the inner's root (uid {uid})")]
    Delegate {
        path: PathBuf,
        uid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the group {path} the inner made")]
    RemoveChild {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot kill the processes of the cgroup through {path}")]
    Kill {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for cgroup {path} to empty")]
    WaitEmpty {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{left} processes in cgroup {path} did not die within {waited:?}")]
    KillTimeout {
        path: PathBuf,
        left: usize,
        waited: Duration,
    },
    #[error("cannot remove cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, CgroupError>;
