//! exec with a PTY: window size changes and Ctrl-C reach the process.

use std::time::Duration;

use futures::SinkExt;
use hull_outer::client::{next, Client};
use hull_proto::{ClientMsg, DaemonMsg, ExecEnd, ExecSpec, ExitStatus, WinSize};
use hull_tests::{block_on, read_until, require_root, TestHull};

async fn wait_end(c: &mut Client) -> ExecEnd {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match next(&mut c.reader).await.unwrap() {
                DaemonMsg::Output { .. } => {}
                DaemonMsg::ExecEnded(end) => return end,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("session did not end")
}

fn tty_spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        user: None,
        tty: Some(WinSize { rows: 24, cols: 80 }),
    }
}

#[test]
fn resize_is_seen_by_stty() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        c.exec_start(tty_spec(&["sh", "-c", "stty size; read line; stty size"]))
            .await
            .unwrap();
        read_until(&mut c, "24 80").await;
        c.writer
            .send(ClientMsg::Resize(WinSize {
                rows: 31,
                cols: 117,
            }))
            .await
            .unwrap();
        c.writer
            .send(ClientMsg::Stdin(b"\n".to_vec()))
            .await
            .unwrap();
        read_until(&mut c, "31 117").await;
        assert_eq!(wait_end(&mut c).await, ExecEnd::Exited(ExitStatus::Code(0)));
    });
}

#[test]
fn ctrl_c_interrupts_sleep() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        c.exec_start(tty_spec(&["sh", "-c", "echo ready; exec sleep 100"]))
            .await
            .unwrap();
        read_until(&mut c, "ready").await;
        // Give sh a moment to exec sleep; the ^C works either way.
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.writer.send(ClientMsg::Stdin(vec![0x03])).await.unwrap();
        assert_eq!(
            wait_end(&mut c).await,
            ExecEnd::Exited(ExitStatus::Signal(libc::SIGINT))
        );
    });
}

#[test]
fn the_pty_is_the_controlling_terminal() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        c.exec_start(tty_spec(&[
            "sh",
            "-c",
            "tty; [ -t 0 ] && [ -t 1 ] && echo both-tty",
        ]))
        .await
        .unwrap();
        let seen = read_until(&mut c, "both-tty").await;
        assert!(seen.contains("/dev/pts/0"), "{seen:?}");
        assert_eq!(wait_end(&mut c).await, ExecEnd::Exited(ExitStatus::Code(0)));
    });
}
