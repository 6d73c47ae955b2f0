//! The single-threaded helper: a fresh exec of hulld's binary that creates
//! the namespaces and forks the inner init. Nothing here may start a thread.

use std::io::Write;

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{fork, ForkResult};

use crate::spec::{InnerSpec, NETNS_FD, USERNS_FD};

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("the inner spec passed to the helper is not valid JSON")]
    Spec(#[source] serde_json::Error),
    #[error("cannot reset oom_score_adj of the helper")]
    OomScore(#[source] std::io::Error),
    #[error("cannot join cgroup through {path}")]
    JoinCgroup {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot join the inner's network namespace (fd {NETNS_FD})")]
    JoinNetns(#[source] nix::Error),
    #[error("cannot create the inner's user namespace")]
    UserNamespace(#[source] crate::userns::UsernsError),
    #[error("cannot move the user namespace's fd to {USERNS_FD}")]
    PlaceUserns(#[source] nix::Error),
    #[error("unshare of the inner's namespaces failed")]
    Unshare(#[source] nix::Error),
    #[error("fork of the inner init failed")]
    Fork(#[source] nix::Error),
}

/// The namespaces of the inner. Its user namespace, when it has one, is
/// made apart ([`crate::userns`]) and entered by the init last, so these
/// stay owned by the VM's.
pub fn namespaces() -> CloneFlags {
    CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWCGROUP
        | CloneFlags::CLONE_NEWPID
}

/// Runs the helper: prints the inner init's pid (as seen from the root
/// namespace) on stdout and returns; the init itself never returns from here.
pub fn run(spec_json: &str) -> Result<(), HelperError> {
    let spec: InnerSpec = serde_json::from_str(spec_json).map_err(HelperError::Spec)?;
    // hulld shields itself with -1000; the inner must stay killable by the
    // OOM killer, and children inherit the value.
    std::fs::write("/proc/self/oom_score_adj", "0").map_err(HelperError::OomScore)?;
    for path in &spec.cgroup_procs {
        std::fs::write(path, "0").map_err(|source| HelperError::JoinCgroup {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(map) = &spec.user_namespace {
        let userns = crate::userns::create(map).map_err(HelperError::UserNamespace)?;
        place_userns(userns)?;
    }
    let mut flags = namespaces();
    if spec.join_netns {
        // SAFETY: hulld dup2()ed the namespace fd to NETNS_FD before exec
        // and nothing else in this single-threaded process owns it.
        let ns = unsafe { OwnedFd::from_raw_fd(NETNS_FD) };
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(HelperError::JoinNetns)?;
        drop(ns);
        flags.remove(CloneFlags::CLONE_NEWNET);
    }
    // The cgroup namespace is rooted where we stand now: the inner group.
    unshare(flags).map_err(HelperError::Unshare)?;
    // SAFETY: the helper is a freshly exec'd, single-threaded process, so the
    // child may run arbitrary code after fork.
    match unsafe { fork() }.map_err(HelperError::Fork)? {
        ForkResult::Child => {
            let code = crate::init::run(&spec);
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", child.as_raw());
            let _ = out.flush();
            Ok(())
        }
    }
}

/// Puts the user namespace's fd where the init looks for it.
fn place_userns(userns: OwnedFd) -> Result<(), HelperError> {
    if userns.as_raw_fd() == USERNS_FD {
        // Already in place: the init takes it over from here.
        let _ = userns.into_raw_fd();
        return Ok(());
    }
    // SAFETY: dup2 onto USERNS_FD, which nothing in the helper owns; the
    // init takes ownership of it. `userns` is closed on drop.
    if unsafe { libc::dup2(userns.as_raw_fd(), USERNS_FD) } < 0 {
        return Err(HelperError::PlaceUserns(nix::Error::last()));
    }
    Ok(())
}
