//! Where hull's groups live: `<hulld's own cgroup>/<name>`, with `daemon`
//! (hulld itself) and `inner` below it.

use std::path::{Path, PathBuf};

use crate::error::{CgroupError, Result};
use crate::handle::Cgroup;
use crate::{v1, v2};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const PROC_SELF_CGROUP: &str = "/proc/self/cgroup";

/// The cgroup hull owns: `<hulld's own cgroup>/<name>`, with `daemon` and
/// `inner` below it.
#[derive(Debug, Clone)]
pub struct HullCgroups {
    pub base: Cgroup,
    pub daemon: Cgroup,
    pub inner: Cgroup,
}

/// The caller's /proc/self/cgroup.
pub(crate) fn read_own() -> Result<String> {
    std::fs::read_to_string(PROC_SELF_CGROUP).map_err(|source| CgroupError::ReadOwn {
        path: PROC_SELF_CGROUP.into(),
        source,
    })
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// The (controllers, path) rows of a /proc/<pid>/cgroup file; v2's row has
/// no controllers.
fn rows(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            Some((parts.next()?, parts.next()?))
        })
        .collect()
}

/// The v1 hierarchies holding `controllers`, each as the list of its
/// controllers (`memory`, `cpu,cpuacct`): what mounting it again takes as
/// options. From the rows of a /proc/<pid>/cgroup file, in `controllers`'
/// order, each hierarchy once.
pub(crate) fn hierarchies(own: &str, controllers: &[&str]) -> Vec<String> {
    let rows = rows(own);
    let mut out: Vec<String> = Vec::new();
    for controller in controllers {
        let found = rows
            .iter()
            .find(|(c, _)| c.split(',').any(|c| c == *controller));
        if let Some((c, _)) = found {
            if !out.iter().any(|o| o == c) {
                out.push(c.to_string());
            }
        }
    }
    out
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

/// The base group for a host whose hierarchies are mounted under `root`,
/// for a process whose /proc/self/cgroup reads `own`.
fn base_in(root: &Path, unified: bool, own: &str, name: &str) -> Result<Cgroup> {
    let rows = rows(own);
    if unified {
        let path = rows
            .iter()
            .find(|(c, _)| c.is_empty())
            .map_or("/", |(_, p)| p);
        return Ok(v2::Manager::new(root.join(base_below(path, name))).into());
    }
    let mut dirs = Vec::new();
    for controller in v1::CONTROLLERS {
        let mount = root.join(controller);
        if !mount.join("cgroup.procs").exists() {
            continue;
        }
        let path = rows
            .iter()
            .find(|(c, _)| c.split(',').any(|c| c == controller))
            .map_or("/", |(_, p)| p);
        dirs.push((controller.to_string(), mount.join(base_below(path, name))));
    }
    if dirs.is_empty() {
        return Err(CgroupError::NoHierarchy {
            root: root.to_path_buf(),
        });
    }
    Ok(v1::Manager::new(dirs).into())
}

impl HullCgroups {
    /// Locates (does not create) hull's groups named `name` below the
    /// caller's own cgroup: v2 where /sys/fs/cgroup is the unified
    /// hierarchy, the v1 controllers otherwise (a hybrid host).
    pub fn locate(name: &str) -> Result<Self> {
        let own = read_own()?;
        let root = Path::new(CGROUP_ROOT);
        Ok(Self::with_base(base_in(
            root,
            is_cgroup2(root),
            &own,
            name,
        )?))
    }

    fn with_base(base: Cgroup) -> Self {
        HullCgroups {
            daemon: base.child("daemon"),
            inner: base.child("inner"),
            base,
        }
    }

    /// Creates the base group and, on v2, delegates the controllers the
    /// inner needs.
    pub fn create_base(&self) -> Result<()> {
        self.base.create()?;
        if let Some(base) = self.base.as_v2() {
            // Controllers must be enabled on every ancestor; the parent of
            // our base may hold processes (it is hulld's own cgroup), which
            // v2 forbids only below the root, so try and report failures.
            base.parent().enable_controllers()?;
            base.enable_controllers()?;
        }
        Ok(())
    }

    /// Moves the caller back to the cgroup it started in and removes hull's
    /// groups; used by `hull down`, after the inner has stopped.
    pub fn teardown(&self) -> Result<()> {
        self.base.parent().join(std::process::id() as i32)?;
        self.inner.remove()?;
        self.daemon.remove()?;
        self.base.remove()
    }

    pub fn version(&self) -> crate::Version {
        self.base.version()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Version;
    use std::fs;

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

    /// This host's own layout: memory somewhere of its own, the rest at /.
    const HYBRID: &str =
        "9:name=systemd:/\n8:pids:/\n6:freezer:/\n4:memory:/api/x\n2:cpu,cpuacct:/\n0::/\n";

    #[test]
    fn v1_groups_sit_below_each_controllers_own_path() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "pids", "freezer"] {
            fs::create_dir_all(root.path().join(c)).unwrap();
            fs::write(root.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        let base = base_in(root.path(), false, HYBRID, "hull").unwrap();
        let hull = HullCgroups::with_base(base);
        assert_eq!(hull.version(), Version::V1);
        let r = root.path().display();
        assert_eq!(
            hull.inner.display_path(),
            format!("{r}/memory/api/x/hull/inner,{r}/pids/hull/inner,{r}/freezer/hull/inner")
        );
        assert_eq!(
            hull.base.parent().display_path(),
            format!("{r}/memory/api/x,{r}/pids,{r}/freezer")
        );
        hull.create_base().unwrap();
        hull.inner.create().unwrap();
        assert!(root.path().join("pids/hull/inner").is_dir());
    }

    #[test]
    fn v1_hierarchies_are_named_by_all_their_controllers() {
        assert_eq!(
            hierarchies(HYBRID, &["memory", "pids", "freezer", "cpu"]),
            ["memory", "pids", "freezer", "cpu,cpuacct"]
        );
        assert_eq!(
            hierarchies(HYBRID, &["cpu", "memory", "cpuacct"]),
            ["cpu,cpuacct", "memory"]
        );
        assert!(hierarchies("0::/\n", &["memory"]).is_empty());
    }

    #[test]
    fn a_host_without_hierarchies_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let err = base_in(root.path(), false, HYBRID, "hull").unwrap_err();
        assert!(matches!(err, CgroupError::NoHierarchy { .. }));
    }

    #[test]
    fn v2_groups_sit_below_the_unified_path_and_get_controllers() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("system.slice/hulld.service");
        fs::create_dir_all(&own).unwrap();
        fs::write(own.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        let text = "0::/system.slice/hulld.service/hull/daemon\n";
        let hull = HullCgroups::with_base(base_in(root.path(), true, text, "hull").unwrap());
        assert_eq!(hull.version(), Version::V2);
        assert_eq!(
            hull.daemon.display_path(),
            own.join("hull/daemon").display().to_string()
        );
        // The base's own files exist only once the kernel makes them; a
        // plain directory has no cgroup.controllers, so nothing is enabled.
        hull.create_base().unwrap();
        assert!(fs::read_to_string(own.join("cgroup.subtree_control"))
            .unwrap()
            .contains("+cpu"));
    }
}
