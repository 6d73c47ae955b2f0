//! The inner container: the single-threaded helper that creates its
//! namespaces, the root filesystem it pivots into, and the inner init that
//! runs as PID 1 inside it. Its cgroup is hulld's (`hull-cgroups`); the
//! helper only writes itself into the `cgroup.procs` files the spec names.
//!
//! hulld never forks from its tokio runtime: it execs its own (sealed, in
//! memory) binary as [`helper::run`], which joins the inner cgroup, unshares
//! the namespaces and forks once. The child becomes the inner init
//! ([`init::run`]), the helper prints the init's pid and exits.

pub mod files;
pub mod helper;
pub mod init;
pub mod layer;
mod mounts;
mod rootfs;
pub mod seccomp;
mod security;
mod spec;
mod userns;

pub use rootfs::SetupError;
pub use seccomp::{SeccompError, SeccompFilter, SeccompOptions};
pub use spec::{
    CgroupView, InnerSpec, FD_CHANNEL_FD, INIT_LINK_FD, INNER_API_BIN, INNER_API_DIR, NETNS_FD,
    USERNS_FD,
};
