//! Which process opened each new listening port, for sessions that tell
//! their clients when their command starts or stops listening (the API's
//! `port_opened` / `port_closed` frames). One task follows the port table
//! for all sessions: the owners of new ports are looked up once per change
//! (a walk of the inner's fds), and only while some session listens.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use hull_network::PortTable;
use tokio::sync::{broadcast, watch};

/// Changes queued for a session that has not yet taken the earlier ones;
/// past this it misses some (it lagged), which costs it notices only.
const QUEUE: usize = 256;

/// How far up the process tree a new port's owner is followed.
const MAX_DEPTH: usize = 64;

/// One listening socket that appeared or went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortChange {
    pub opened: bool,
    pub port: u16,
    pub address: IpAddr,
    /// The owner's pid and its ancestors', as the inner sees them, owner
    /// first; empty for a closed port or an owner not found.
    pub lineage: Vec<i32>,
}

impl PortChange {
    /// The owner's pid inside the inner, 0 when unknown.
    pub fn pid(&self) -> i32 {
        self.lineage.first().copied().unwrap_or(0)
    }
}

pub struct PortEvents {
    tx: broadcast::Sender<Arc<PortChange>>,
}

impl PortEvents {
    /// Follows `ports`; `inner_pids` lists the inner's processes (host pids).
    pub fn start(
        ports: watch::Receiver<PortTable>,
        inner_pids: impl Fn() -> Vec<i32> + Send + Sync + 'static,
    ) -> Arc<PortEvents> {
        let (tx, _) = broadcast::channel(QUEUE);
        tokio::spawn(follow(ports, tx.clone(), Arc::new(inner_pids)));
        Arc::new(PortEvents { tx })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<PortChange>> {
        self.tx.subscribe()
    }
}

type Listening = BTreeSet<(u16, IpAddr, u64)>;

fn listening(table: &PortTable) -> Listening {
    table
        .ports
        .iter()
        .map(|p| (p.port, p.addr, p.inode))
        .collect()
}

async fn follow(
    mut ports: watch::Receiver<PortTable>,
    tx: broadcast::Sender<Arc<PortChange>>,
    inner_pids: Arc<dyn Fn() -> Vec<i32> + Send + Sync>,
) {
    let mut before = listening(&ports.borrow_and_update());
    while ports.changed().await.is_ok() {
        let now = listening(&ports.borrow_and_update());
        if tx.receiver_count() > 0 {
            let opened: Vec<_> = now.difference(&before).copied().collect();
            let closed = before
                .difference(&now)
                .map(|&(port, address, _)| PortChange {
                    opened: false,
                    port,
                    address,
                    lineage: Vec::new(),
                });
            let mut changes: Vec<PortChange> = closed.collect();
            if !opened.is_empty() {
                let pids = inner_pids.clone();
                // Reading every process's fds under /proc: off the workers.
                let found = tokio::task::spawn_blocking(move || owners(&opened, &pids()))
                    .await
                    .unwrap_or_default();
                changes.extend(found);
            }
            for change in changes {
                let _ = tx.send(Arc::new(change));
            }
        }
        before = now;
    }
}

/// Each opened socket with its owner's lineage.
fn owners(opened: &[(u16, IpAddr, u64)], inner_pids: &[i32]) -> Vec<PortChange> {
    let owners = hull_network::ports::socket_owners(inner_pids);
    opened
        .iter()
        .map(|&(port, address, inode)| PortChange {
            opened: true,
            port,
            address,
            lineage: owners
                .get(&inode)
                .map(|o| lineage(o.pid))
                .unwrap_or_default(),
        })
        .collect()
}

/// `host_pid` and its ancestors as pids inside the inner, up to the
/// inner's init (pid 1 there).
fn lineage(host_pid: i32) -> Vec<i32> {
    let mut chain = Vec::new();
    let mut pid = host_pid;
    while chain.len() < MAX_DEPTH && pid > 1 {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            break;
        };
        let Some((inner_pid, parent)) = parse_status(&status) else {
            break;
        };
        chain.push(inner_pid);
        if inner_pid <= 1 {
            break;
        }
        pid = parent;
    }
    chain
}

/// `host_pid` as the inner's own tools name it (`NSpid:`'s last field).
pub(crate) fn inner_pid(host_pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    parse_status(&status).map(|(inner, _)| inner)
}

/// The innermost pid (`NSpid:`'s last field) and the parent's host pid
/// (`PPid:`) from /proc/PID/status.
fn parse_status(status: &str) -> Option<(i32, i32)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::to_owned)
    };
    let inner = field("NSpid:")?.split_whitespace().last()?.parse().ok()?;
    let parent = field("PPid:")?.trim().parse().ok()?;
    Some((inner, parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gives_the_innermost_pid_and_the_parent() {
        let status = "Name:\tsh\nPid:\t4242\nPPid:\t4200\nNSpid:\t4242\t7\n";
        assert_eq!(parse_status(status), Some((7, 4200)));
        let flat = "PPid:\t1\nNSpid:\t99\n";
        assert_eq!(parse_status(flat), Some((99, 1)));
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn our_own_lineage_climbs_to_the_top() {
        let me = i32::try_from(std::process::id()).unwrap();
        let chain = lineage(me);
        assert_eq!(chain.first(), Some(&me), "{chain:?}");
        let parent = i32::try_from(std::os::unix::process::parent_id()).unwrap();
        if parent > 1 {
            assert_eq!(chain.get(1), Some(&parent), "{chain:?}");
        }
    }
}
