//! Keeps the [`PortTable`] current: a sock_diag scan of the inner's
//! namespace every interval (a dump of its few listening sockets costs
//! microseconds), published only when something changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::ports::{diff, ListenScanner};
use crate::PortTable;

/// Ports that stopped listening are remembered this long.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Starts the scan loop; `running` says whether an inner is up, and a
/// notification on `rescan` asks for a scan now (someone awaits a port).
/// Every scan updates [`PortTable::scanned_at`]; readers are woken only
/// when the ports changed.
pub fn watch_ports(
    mut scanner: ListenScanner,
    mut running: watch::Receiver<bool>,
    interval: Duration,
    rescan: Arc<Notify>,
) -> watch::Receiver<PortTable> {
    let (tx, rx) = watch::channel(PortTable::default());
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            let up = *running.borrow_and_update();
            let began = Instant::now();
            match scanner.scan() {
                Ok(now) => {
                    failing = false;
                    tx.send_if_modified(|table| {
                        table.scanned_at = Some(began);
                        update(table, now, up)
                    });
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "scanning the inner's listening ports failed");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = rescan.notified() => {}
                changed = running.changed() => if changed.is_err() { break },
                _ = tx.closed() => break,
            }
        }
    });
    rx
}

/// Applies one scan; returns whether anything a reader sees changed.
fn update(table: &mut PortTable, now: Vec<crate::ListeningPort>, up: bool) -> bool {
    let (appeared, gone) = diff(&table.ports, &now);
    let at = Instant::now();
    for port in gone {
        table.recently_gone.insert(port, at);
    }
    for port in &appeared {
        table.recently_gone.remove(port);
    }
    table
        .recently_gone
        .retain(|_, t| t.elapsed() < FORGET_AFTER);
    let changed = table.ports != now || table.inner_running != up;
    table.ports = now;
    table.inner_running = up;
    changed
}
