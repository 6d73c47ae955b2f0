//! File operations shared by both versions. They return plain I/O errors;
//! each caller wraps them in the variant of its own step.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub(crate) const PROCS: &str = "cgroup.procs";

/// Writes `value` in one write(2), as cgroupfs wants, to a file that must
/// exist: creating it would hide a missing controller (and does, in the
/// plain directories the unit tests use).
pub(crate) fn write(path: &Path, value: &str) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).truncate(true).open(path)?;
    file.write_all(value.as_bytes())
}

/// The value of `key` in a flat-keyed file (`key value` lines) such as
/// cgroup.events, memory.events or memory.oom_control.
pub(crate) fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once(char::is_whitespace)?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

pub(crate) fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    keyed_value(&fs::read_to_string(path).ok()?, key)
}

pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The pids listed in `dir/cgroup.procs`; a directory that is gone has none.
pub(crate) fn procs(dir: &Path) -> io::Result<Vec<i32>> {
    match fs::read_to_string(dir.join(PROCS)) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// `dir` and every cgroup below it, parents before children.
pub(crate) fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(entry.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Every pid in `dir` and the cgroups below it (v1's cgroup.procs lists
/// only a group's own members; the inner may have made groups of its own).
pub(crate) fn subtree_procs(dir: &Path) -> Result<Vec<i32>, (PathBuf, io::Error)> {
    let mut pids = Vec::new();
    for d in subtree(dir) {
        pids.extend(procs(&d).map_err(|e| (d.join(PROCS), e))?);
    }
    Ok(pids)
}

/// SIGKILLs `pids`, sparing the caller and pid 1 (neither can be in a
/// group hull kills, but a wrong path must not take either down).
pub(crate) fn sigkill(pids: &[i32]) {
    let me = std::process::id() as i32;
    for &pid in pids.iter().filter(|&&p| p > 1 && p != me) {
        // ESRCH (it died meanwhile) is what we want anyway.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Creates `dir` and its missing parents; an existing one is fine. `dir`
/// is 0755 whatever hulld's umask (077): the inner reads its own group
/// read-only at /sys/fs/cgroup, and in a user namespace of its own its
/// root is "other" to a group the VM's root owns.
pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir_all(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
        _ => fs::set_permissions(dir, fs::Permissions::from_mode(0o755)),
    }
}

/// Removes `dir` and the cgroups below it, children first. A cgroup that is
/// already gone is fine; EBUSY is retried for a while because the kernel
/// frees a cgroup a moment after its last process has been reaped.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), (PathBuf, io::Error)> {
    for d in subtree(dir).iter().rev() {
        let start = Instant::now();
        loop {
            match fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && start.elapsed() < Duration::from_secs(2) =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err((d.clone(), e)),
            }
        }
    }
    Ok(())
}

/// Waits until `key` in the flat-keyed file `path` (cgroup.events) reads
/// `want`, or `timeout` passes; returns whether it does. cgroupfs wakes a
/// poll(2) for POLLPRI on an fd that has read the file when the file
/// changes, so this sleeps only as long as the kernel takes. The poll is
/// cut into slices all the same, growing from 1 ms: the kernel holds back a
/// notification that comes within 10 ms of the previous one (a thaw just
/// before a kill), and a file that does not notify at all (an older kernel,
/// a plain file in a test) must cost latency, not a hang.
pub(crate) fn wait_keyed(path: &Path, key: &str, want: u64, timeout: Duration) -> io::Result<bool> {
    const MAX_SLICE: Duration = Duration::from_millis(20);
    let file = File::open(path)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    let mut slice = Duration::from_millis(1);
    loop {
        // Reading at offset 0 through the same fd re-arms the notification.
        let n = file.read_at(&mut buf, 0)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        if keyed_value(&text, key) == Some(want) {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let ms = u16::try_from((deadline - now).min(slice).as_millis().max(1)).unwrap_or(u16::MAX);
        slice = (slice * 2).min(MAX_SLICE);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values_are_found_by_whole_key() {
        let text = "oom 3\noom_kill 2\noom_group_kill 1\n";
        assert_eq!(keyed_value(text, "oom_kill"), Some(2));
        assert_eq!(keyed_value(text, "oom"), Some(3));
        assert_eq!(keyed_value(text, "max"), None);
        assert_eq!(keyed_value("populated 1\nfrozen 0\n", "frozen"), Some(0));
    }

    #[test]
    fn write_does_not_create_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(&dir.path().join("cpu.max"), "max").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(!dir.path().join("cpu.max").exists());
    }

    #[test]
    fn the_subtree_lists_parents_first_and_is_removed_children_first() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("g");
        fs::create_dir_all(top.join("a/b")).unwrap();
        fs::create_dir_all(top.join("c")).unwrap();
        fs::write(top.join(PROCS), "5\n6\n").unwrap();
        fs::write(top.join("a/b").join(PROCS), "7\n").unwrap();
        let tree = subtree(&top);
        assert_eq!(tree[0], top);
        assert_eq!(tree.len(), 4);
        let mut pids = subtree_procs(&top).unwrap();
        pids.sort();
        assert_eq!(pids, vec![5, 6, 7]);
        // remove_dir of a real cgroup ignores its control files; here they
        // are plain files, so take them away first.
        fs::remove_file(top.join(PROCS)).unwrap();
        fs::remove_file(top.join("a/b").join(PROCS)).unwrap();
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        remove_tree(&top).unwrap();
    }

    #[test]
    fn waiting_on_a_file_that_never_changes_ends_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("cgroup.events");
        fs::write(&events, "populated 1\nfrozen 0\n").unwrap();
        let start = Instant::now();
        assert!(!wait_keyed(&events, "populated", 0, Duration::from_millis(50)).unwrap());
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(wait_keyed(&events, "frozen", 0, Duration::from_secs(5)).unwrap());
    }
}
