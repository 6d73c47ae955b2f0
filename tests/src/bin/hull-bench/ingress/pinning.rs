//! CPU placement for the proxy runs, and the CPU time processes spend.

use anyhow::{bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use super::upstream::KeepAliveServer;

/// The CPUs of a run where the proxy has a core of its own: the last
/// allowed CPU for the proxy, the others for wrk and the server.
pub struct ProxyCores {
    pub client: Vec<usize>,
    pub proxy: usize,
}

/// What `ProxyCores::apply` changed, to put back.
pub struct Placement {
    hulld: i32,
    hulld_before: CpuSet,
    server_before: CpuSet,
}

impl ProxyCores {
    pub fn split() -> Option<ProxyCores> {
        let allowed = sched_getaffinity(Pid::from_raw(0)).ok()?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap_or(false))
            .collect();
        let (&proxy, client) = cpus.split_last()?;
        (!client.is_empty()).then(|| ProxyCores {
            client: client.to_vec(),
            proxy,
        })
    }

    pub fn client_list(&self) -> String {
        let list: Vec<String> = self.client.iter().map(|c| c.to_string()).collect();
        list.join(",")
    }

    fn set(cpus: &[usize]) -> Result<CpuSet> {
        let mut set = CpuSet::new();
        for &c in cpus {
            set.set(c)?;
        }
        Ok(set)
    }

    /// Pins every thread of hulld to the proxy core and the server's
    /// threads to the client cores.
    pub fn apply(&self, hulld: i32, server: &KeepAliveServer) -> Result<Placement> {
        let hulld_before = sched_getaffinity(Pid::from_raw(hulld))
            .context("read the CPUs of hulld's main thread")?;
        set_threads_affinity(hulld, &Self::set(&[self.proxy])?)?;
        let server_before = server.set_affinity(&Self::set(&self.client)?)?;
        Ok(Placement {
            hulld,
            hulld_before,
            server_before,
        })
    }

    /// Runs `f` with the calling thread on the client cores, so that what
    /// it spawns (wrk) starts there.
    pub fn on_client_cores<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        on_cores(&self.client, f)
    }

    /// Runs `f` with the calling thread on the proxy core, so that what it
    /// spawns (nginx, HAProxy) and their children start there.
    pub fn on_proxy_core<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        on_cores(&[self.proxy], f)
    }
}

fn on_cores<T>(cpus: &[usize], f: impl FnOnce() -> Result<T>) -> Result<T> {
    let me = Pid::from_raw(0);
    let before = sched_getaffinity(me)?;
    sched_setaffinity(me, &ProxyCores::set(cpus)?)
        .with_context(|| format!("pin the bench to CPUs {cpus:?}"))?;
    let result = f();
    sched_setaffinity(me, &before)?;
    result
}

impl Placement {
    /// Threads hulld started meanwhile inherited the pinned mask, so every
    /// thread it has now gets the main thread's mask back.
    pub fn undo(self, server: &KeepAliveServer) -> Result<()> {
        set_threads_affinity(self.hulld, &self.hulld_before)?;
        server.set_affinity(&self.server_before)?;
        Ok(())
    }
}

/// Sets the CPUs of every thread a process has.
fn set_threads_affinity(pid: i32, cpus: &CpuSet) -> Result<()> {
    for tid in threads(pid)? {
        match sched_setaffinity(Pid::from_raw(tid), cpus) {
            // A thread that ended since the listing has nothing to set.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => bail!("set the CPUs of thread {tid} of process {pid}: {e}"),
        }
    }
    Ok(())
}

/// The thread ids of a process.
fn threads(pid: i32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/task");
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("list {dir}"))? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// The children of a process (those of its main thread: nginx's workers).
pub fn children(pid: i32) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let list = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    Ok(list
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// utime + stime of a set of processes (all their threads), in clock ticks.
pub fn cpu_ticks(pids: &[i32]) -> Result<u64> {
    let mut sum = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        // Fields after the command, which may hold spaces, start at state (3).
        let after = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        sum += fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    }
    Ok(sum)
}

/// Busy time of the whole machine, all CPUs, in clock ticks: from the
/// first line of /proc/stat, everything but idle and iowait. Work the
/// kernel does for a path in softirqs and kworkers shows here and in no
/// process's own times.
pub fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("malformed /proc/stat")?;
    // user nice system idle iowait irq softirq steal; guest and
    // guest_nice are already counted in user and nice.
    let (idle, iowait) = (fields.get(3).copied(), fields.get(4).copied());
    let (Some(idle), Some(iowait)) = (idle, iowait) else {
        bail!("/proc/stat has no idle and iowait");
    };
    let total: u64 = fields.iter().take(8).sum();
    Ok(total - idle - iowait)
}

pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}
