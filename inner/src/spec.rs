use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use hull_proto::IdMapping;

use crate::seccomp::SeccompFilter;

/// The init link (a stream socketpair end) is fd 3 in the helper and init.
pub const INIT_LINK_FD: i32 = 3;
/// The fd channel (a seqpacket socketpair end) is fd 4.
pub const FD_CHANNEL_FD: i32 = 4;
/// The network namespace to join, when [`InnerSpec::join_netns`] is set, is
/// fd 5 in the helper; the helper closes it after setns(2).
pub const NETNS_FD: i32 = 5;
/// The inner's user namespace, when [`InnerSpec::user_namespace`] is set,
/// is fd 6 in the init, which enters it once the root filesystem is built.
pub const USERNS_FD: i32 = 6;

/// Everything the helper needs to create one inner container. hulld passes
/// it as JSON in the helper's argv.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InnerSpec {
    /// The base image, the read-only lower layer.
    pub lower: PathBuf,
    /// The user's writable layer: overlay upper and work directories.
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Where the overlay is mounted, inside the inner's own mount namespace
    /// only; the directory must exist.
    pub rootfs: PathBuf,
    pub hostname: String,
    /// `cgroup.procs` files the helper writes itself into before it forks.
    pub cgroup_procs: Vec<PathBuf>,
    /// Join the network namespace on [`NETNS_FD`] (hulld's, which outlives
    /// the inner) instead of creating a new one.
    #[serde(default)]
    pub join_netns: bool,
    /// A file hulld wrote, bind-mounted on the inner's /etc/resolv.conf.
    #[serde(default)]
    pub resolv_conf: Option<PathBuf>,
    /// hulld's directory for the inner (the service socket and the `hull`
    /// client), bind-mounted read-only on [`INNER_API_DIR`].
    #[serde(default)]
    pub api_dir: Option<PathBuf>,
    /// How the inner sees its cgroup at /sys/fs/cgroup: read-only, and
    /// rooted at its own group by the cgroup namespace, so programs read
    /// their own limits. `None`: /sys/fs/cgroup stays as sysfs has it.
    #[serde(default)]
    pub cgroup_view: Option<CgroupView>,
    /// The seccomp filter the init installs on itself before it drops its
    /// capabilities, so every process of the inner inherits it. `None`:
    /// no filter (`[inner] seccomp = false`).
    #[serde(default)]
    pub seccomp: Option<SeccompFilter>,
    /// The inner's own user namespace and how it maps ids; `None`: the
    /// inner's root is the VM's root (`[inner] user_namespace = false`).
    #[serde(default)]
    pub user_namespace: Option<IdMapping>,
}

/// The cgroup hierarchies to mount at the inner's /sys/fs/cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupView {
    /// cgroup2 at /sys/fs/cgroup.
    Unified,
    /// A tmpfs at /sys/fs/cgroup with a directory per v1 hierarchy, named
    /// by its controllers as mount options (`memory`, `cpu,cpuacct`), and
    /// a symlink per controller where a hierarchy has several.
    V1(Vec<String>),
}

/// Where the inner sees [`InnerSpec::api_dir`], and its `hull` client.
pub use hull_proto::{INNER_API_BIN, INNER_API_DIR};
