//! Where hull's groups live, decided here and nowhere else.
//!
//! hull's groups go below its *delegated group*: the cgroup hulld was
//! started in (the root of a VM that hull-init runs, `hull.service` under
//! systemd's `Delegate=yes`), found again from inside the groups a hulld
//! moves itself to, so that a restarted hulld, or any process those moves
//! took along, finds the same ones:
//!
//! | hulld's own cgroup             | delegated group D            |
//! |--------------------------------|------------------------------|
//! | `/`                            | `/`                          |
//! | `/system.slice/hull.service`   | `/system.slice/hull.service` |
//! | `D/supervisor` (v2)            | D                            |
//! | `D/<name>/daemon`              | D                            |
//!
//! Below D: `D/<name>` (the base) with `daemon` (hulld) and `inner`. On v2
//! a group that hands controllers to its children may hold no process,
//! the root alone excepted, so when D is not the root its processes first
//! move to the leaf `D/supervisor`: systemd's name for a delegated unit's
//! supervising process (`DelegateSubgroup=supervisor`), so a unit that
//! sets it starts hulld where hulld would have gone.

use std::path::{Path, PathBuf};

use crate::error::{CgroupError, Result};
use crate::handle::Cgroup;
use crate::manager::CgroupManager;
use crate::{v1, v2};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const PROC_SELF_CGROUP: &str = "/proc/self/cgroup";
/// The leaf of a delegated v2 group that is not the root.
const LEAF: &str = "supervisor";
/// The kernel shows `cgroup.type` in every v2 group but the root.
const NOT_ROOT_MARK: &str = "cgroup.type";
/// How often a delegated group is emptied into its leaf before enabling
/// its controllers gives up: a process may fork into it meanwhile.
const LEAF_ROUNDS: usize = 3;

/// The cgroups hull owns: `<delegated group>/<name>`, with `daemon` and
/// `inner` below it, and on v2 below a non-root group the leaf beside it.
#[derive(Debug, Clone)]
pub struct HullCgroups {
    pub base: Cgroup,
    pub daemon: Cgroup,
    pub inner: Cgroup,
    /// `D/supervisor` when the delegated group D is a v2 group other than
    /// the root: where D's processes go before D's controllers are enabled
    /// for its children, and where hulld goes back to before hull's groups
    /// are removed. `None` on the root and on v1, which take processes
    /// beside child groups.
    pub leaf: Option<Cgroup>,
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

/// The delegated group (relative to the hierarchy's root, empty for the
/// root) of a process whose cgroup is `own`: `own` less the groups of
/// hull's own a hulld moves to (the table above; the leaf only on v2).
fn delegated(own: &str, name: &str, unified: bool) -> PathBuf {
    let own = own.trim_end_matches('/');
    let daemon = format!("/{name}/daemon");
    let leaf = format!("/{LEAF}");
    let group = match own.strip_suffix(&daemon) {
        Some(group) => group,
        None if unified => own.strip_suffix(&leaf).unwrap_or(own),
        None => own,
    };
    PathBuf::from(group.trim_start_matches('/'))
}

/// hull's groups named `name` on a host whose hierarchies are mounted
/// under `root`, for a process whose /proc/self/cgroup reads `own`.
fn layout(root: &Path, unified: bool, own: &str, name: &str) -> Result<HullCgroups> {
    let rows = rows(own);
    if unified {
        let path = rows
            .iter()
            .find(|(c, _)| c.is_empty())
            .map_or("/", |(_, p)| p);
        let group = root.join(delegated(path, name, true));
        let leaf = group
            .join(NOT_ROOT_MARK)
            .exists()
            .then(|| v2::Manager::new(group.join(LEAF)).into());
        return Ok(HullCgroups::new(
            v2::Manager::new(group.join(name)).into(),
            leaf,
        ));
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
        let group = mount.join(delegated(path, name, false));
        dirs.push((controller.to_string(), group.join(name)));
    }
    if dirs.is_empty() {
        return Err(CgroupError::NoHierarchy {
            root: root.to_path_buf(),
        });
    }
    Ok(HullCgroups::new(v1::Manager::new(dirs).into(), None))
}

/// Moves every process of `group` to `leaf`; returns their pids. One that
/// exits meanwhile is not an error.
fn empty_into(group: &v2::Manager, leaf: &v2::Manager) -> Result<Vec<i32>> {
    let pids = group.pids()?;
    let procs = leaf.dir().join(crate::fs::PROCS);
    let mut moved = Vec::new();
    for pid in pids {
        match crate::fs::write(&procs, &pid.to_string()) {
            Ok(()) => moved.push(pid),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(source) => {
                return Err(CgroupError::MoveToLeaf {
                    pid,
                    group: group.dir().to_path_buf(),
                    path: procs,
                    source,
                })
            }
        }
    }
    Ok(moved)
}

impl HullCgroups {
    /// Locates (does not create) hull's groups named `name` for the
    /// caller's own cgroup: v2 where /sys/fs/cgroup is the unified
    /// hierarchy, the v1 controllers otherwise (a hybrid host).
    pub fn locate(name: &str) -> Result<Self> {
        let own = read_own()?;
        let root = Path::new(CGROUP_ROOT);
        layout(root, is_cgroup2(root), &own, name)
    }

    fn new(base: Cgroup, leaf: Option<Cgroup>) -> Self {
        HullCgroups {
            daemon: base.child("daemon"),
            inner: base.child("inner"),
            base,
            leaf,
        }
    }

    /// Creates the base group and, on v2, delegates the controllers the
    /// inner needs: on every ancestor up to the delegated group, after its
    /// processes (hulld among them) have moved to the leaf. Returns the
    /// pids that moved.
    pub fn create_base(&self) -> Result<Vec<i32>> {
        let mut moved = Vec::new();
        if let Some(base) = self.base.as_v2() {
            let group = base.parent();
            match self.leaf.as_ref().and_then(Cgroup::as_v2) {
                Some(leaf) => {
                    leaf.create()?;
                    let mut round = 1;
                    loop {
                        moved.extend(empty_into(&group, leaf)?);
                        match group.enable_controllers() {
                            Err(CgroupError::EnableControllers { source, .. })
                                if source.raw_os_error() == Some(libc::EBUSY)
                                    && round < LEAF_ROUNDS =>
                            {
                                round += 1;
                            }
                            result => break result?,
                        }
                    }
                }
                // The root takes processes and controllers for its
                // children at once.
                None => group.enable_controllers()?,
            }
            self.base.create()?;
            base.enable_controllers()?;
        } else {
            self.base.create()?;
        }
        Ok(moved)
    }

    /// Moves the caller out of hull's groups, back to the cgroup it
    /// started in (to the leaf on v2 below a non-root group, which can no
    /// longer take it), and removes them; used by `hull down`, after the
    /// inner has stopped.
    pub fn teardown(&self) -> Result<()> {
        let home = self.leaf.clone().unwrap_or_else(|| self.base.parent());
        home.join(std::process::id() as i32)?;
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
    fn the_delegated_group_is_found_again_from_inside_hulls_groups() {
        assert_eq!(delegated("/", "hull", true), PathBuf::from(""));
        assert_eq!(delegated("/a/b", "hull", true), PathBuf::from("a/b"));
        assert_eq!(
            delegated("/a/b/hull/daemon", "hull", true),
            PathBuf::from("a/b")
        );
        assert_eq!(
            delegated("/a/b/supervisor", "hull", true),
            PathBuf::from("a/b")
        );
        assert_eq!(delegated("/supervisor", "hull", true), PathBuf::from(""));
        assert_eq!(
            delegated("/a/other/daemon", "hull", true),
            PathBuf::from("a/other/daemon")
        );
        // v1 has no leaf: a group of that name is the host's own.
        assert_eq!(
            delegated("/a/supervisor", "hull", false),
            PathBuf::from("a/supervisor")
        );
        assert_eq!(
            delegated("/a/hull/daemon", "hull", false),
            PathBuf::from("a")
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
        let hull = layout(root.path(), false, HYBRID, "hull").unwrap();
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
        let err = layout(root.path(), false, HYBRID, "hull").unwrap_err();
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
        let hull = layout(root.path(), true, text, "hull").unwrap();
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

    /// A delegated v2 group that is not the root (systemd's `Delegate=yes`
    /// unit): the files the kernel shows in one, with `procs` as members.
    fn fake_delegated(dir: &Path, procs: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("cgroup.type"), "domain\n").unwrap();
        // No cpu: it is written on its own, over the others in a plain file.
        fs::write(dir.join("cgroup.controllers"), "memory pids\n").unwrap();
        fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
        fs::write(dir.join("cgroup.procs"), procs).unwrap();
    }

    #[test]
    fn a_delegated_group_with_processes_moves_them_to_a_leaf_first() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("system.slice/hull.service");
        fake_delegated(&own, "4242\n");
        // The leaf's cgroup.procs, as the kernel makes it with the group.
        let leaf = own.join("supervisor");
        fs::create_dir_all(&leaf).unwrap();
        fs::write(leaf.join("cgroup.procs"), "").unwrap();
        let text = "0::/system.slice/hull.service\n";
        let hull = layout(root.path(), true, text, "hull").unwrap();
        assert_eq!(
            hull.inner.display_path(),
            own.join("hull/inner").display().to_string()
        );
        assert_eq!(
            hull.leaf.as_ref().map(Cgroup::display_path),
            Some(leaf.display().to_string())
        );
        assert_eq!(hull.create_base().unwrap(), vec![4242]);
        // v2 refuses controllers for the children of a non-root group
        // that has processes: they go to the leaf first.
        assert_eq!(
            fs::read_to_string(leaf.join("cgroup.procs")).unwrap(),
            "4242"
        );
        assert!(fs::read_to_string(own.join("cgroup.subtree_control"))
            .unwrap()
            .contains("+memory"));

        // A process the move took along finds the same groups.
        let moved = layout(
            root.path(),
            true,
            "0::/system.slice/hull.service/supervisor\n",
            "hull",
        )
        .unwrap();
        assert_eq!(moved.inner.display_path(), hull.inner.display_path());
        assert_eq!(moved.leaf, hull.leaf);

        // The delegated group takes no process back: hulld leaves for the
        // leaf before hull's groups go.
        hull.daemon.create().unwrap();
        hull.inner.create().unwrap();
        hull.teardown().unwrap();
        assert_eq!(
            fs::read_to_string(leaf.join("cgroup.procs")).unwrap(),
            std::process::id().to_string()
        );
        assert!(!own.join("hull").exists());
    }

    #[test]
    fn the_root_has_no_leaf() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "memory pids\n").unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        fs::write(root.path().join("cgroup.procs"), "1\n").unwrap();
        let hull = layout(root.path(), true, "0::/\n", "hull").unwrap();
        assert!(hull.leaf.is_none());
        assert_eq!(
            hull.base.display_path(),
            root.path().join("hull").display().to_string()
        );
        assert!(hull.create_base().unwrap().is_empty());
        assert!(
            fs::read_to_string(root.path().join("cgroup.subtree_control"))
                .unwrap()
                .contains("+pids")
        );
    }
}
