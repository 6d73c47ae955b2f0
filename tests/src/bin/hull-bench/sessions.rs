//! Many idle terminal sessions, each with a client attached: hulld's RSS
//! before and after, and what one session costs. Each session runs `cat`
//! on a PTY (it waits for input and writes nothing) with its own
//! connection over the control socket, as `hull exec -t` has.

use std::time::Duration;

use anyhow::{Context, Result};
use hull_proto::{ExecSpec, WinSize};
use hull_tests::{block_on, Limits, TestHull};

use crate::report::{print_single, proc_status_kib};

pub fn run(sessions: usize) -> Result<()> {
    raise_fd_limit(sessions)?;
    let hull = TestHull::start_with(Limits {
        memory_max: "2G",
        pids_max: u64::try_from(sessions)? + 256,
        tables: format!("[daemon]\ncontrol_connections = {}\n", sessions + 64),
        ..Limits::default()
    });
    let hulld = hull.hulld_pid();
    let rss = || proc_status_kib(hulld, "VmRSS").context("hulld's VmRSS");
    block_on(async {
        // One exec first, so what every session shares (the runtime's
        // workers, buffers grown once) is in the baseline.
        let _ = hull.exec(&["true"]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss()?;
        let mut clients = Vec::with_capacity(sessions);
        for i in 0..sessions {
            let mut c = hull.client().await;
            let spec = ExecSpec {
                argv: vec!["cat".into()],
                env: Vec::new(),
                cwd: None,
                user: None,
                tty: Some(WinSize { rows: 24, cols: 80 }),
            };
            c.exec_begin(spec)
                .await
                .with_context(|| format!("session {i}"))?;
            clients.push(c);
        }
        let listed = hull.client().await.sessions_list().await?;
        let attached = listed.iter().filter(|s| s.clients == 1).count();
        anyhow::ensure!(
            attached == sessions,
            "{attached} of {sessions} sessions have their client"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss()?;
        let extra_mib = (after - before) / 1024.0;
        println!("{sessions} idle terminal sessions, a client attached to each:");
        print_single("hulld RSS before", before / 1024.0, "MiB", "");
        print_single("hulld RSS with the sessions", after / 1024.0, "MiB", "");
        print_single("extra", extra_mib, "MiB", "<= 64 MiB");
        #[allow(clippy::cast_precision_loss)]
        let per_session = (after - before) / sessions as f64;
        print_single("per session", per_session, "KiB", "");
        drop(clients);
        Ok(())
    })
}

/// This process holds a connection per session.
fn raise_fd_limit(sessions: usize) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = u64::try_from(sessions)? + 256;
    if soft < want {
        anyhow::ensure!(
            hard >= want,
            "{sessions} sessions need {want} fds; the hard limit is {hard}"
        );
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    }
    Ok(())
}
