//! hull's cgroups, which only hulld touches: the inner's group with its
//! limits, freezer and kill, and hulld's own group beside it, all below the
//! cgroup hulld was started in (on cgroup v2 below a group that is not the
//! root, after its processes have moved to a leaf: [`HullCgroups`]).
//!
//! One implementation per version behind [`CgroupManager`]: [`v2`] (one
//! directory per group in the unified hierarchy) and [`v1`] (one directory
//! per controller, as on a hybrid host). Callers hold a [`Cgroup`] and
//! find hull's groups with [`HullCgroups::locate`].
//!
//! Everything here is synchronous file I/O on cgroupfs, and `freeze`,
//! `kill_all` and `remove` wait for the kernel: call them from async code
//! through `tokio::task::spawn_blocking`.

mod error;
mod fs;
mod handle;
mod hull;
mod manager;
mod oom;
pub mod v1;
pub mod v2;

pub use error::{CgroupError, Result};
pub use handle::Cgroup;
pub use hull::HullCgroups;
pub use manager::{CgroupManager, CpuLimits, CpuMax, Version};
pub use oom::OomWatch;
