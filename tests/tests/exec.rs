//! exec over the control socket: separate streams, exit codes, stdin, size.

use hull_outer::client::ClientError;
use hull_proto::{ErrorKind, ExecEnd, ExitStatus, SpawnErrorKind};
use hull_tests::{block_on, require_root, spec, TestHull};

fn code(end: &ExecEnd) -> i32 {
    match end {
        ExecEnd::Exited(s) => s.shell_code(),
        other => panic!("session did not end with an exit: {other:?}"),
    }
}

#[test]
fn stdout_and_stderr_stay_separate() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let out = hull
            .exec(&["sh", "-c", "echo to-out; echo to-err >&2; echo more-out"])
            .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "to-out\nmore-out\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "to-err\n");
        assert_eq!(code(&out.end), 0);
    });
}

#[test]
fn exit_codes_are_the_commands() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        assert_eq!(
            hull.exec(&["true"]).await.end,
            ExecEnd::Exited(ExitStatus::Code(0))
        );
        assert_eq!(
            hull.exec(&["sh", "-c", "exit 3"]).await.end,
            ExecEnd::Exited(ExitStatus::Code(3))
        );
        assert_eq!(
            hull.exec(&["sh", "-c", "kill -9 $$"]).await.end,
            ExecEnd::Exited(ExitStatus::Signal(9))
        );
        let mut c = hull.client().await;
        match c.exec_collect(spec(&["/no/such/program"]), b"").await {
            Err(ClientError::Daemon(report)) => {
                assert_eq!(report.kind, ErrorKind::Spawn(SpawnErrorKind::NotFound));
                assert!(
                    report.message.contains("/no/such/program"),
                    "{}",
                    report.message
                );
            }
            other => panic!("missing program: expected a spawn error, got {other:?}"),
        }
    });
}

#[test]
fn cli_exit_codes_follow_the_shell_convention() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let run = |args: &[&str]| hull.hull(args).status.code().unwrap();
    assert_eq!(run(&["exec", "--", "true"]), 0);
    assert_eq!(run(&["exec", "--", "sh", "-c", "exit 3"]), 3);
    assert_eq!(run(&["exec", "--", "no-such-program"]), 127);
    assert_eq!(run(&["exec", "--", "sh", "-c", "kill -9 $$"]), 137);
    let out = hull.hull(&[
        "exec",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi there\n/tmp\n");
    let out = hull.hull(&["exec", "-w", "/no/such/dir", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/no/such/dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn stdin_round_trips() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let input: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let out = hull.exec_with_stdin(&["cat"], &input).await;
        assert_eq!(code(&out.end), 0);
        assert_eq!(out.stdout.len(), input.len());
        assert!(out.stdout == input, "cat returned different bytes");
    });
}

#[test]
fn ten_megabytes_of_output_arrive_whole() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let out = hull.exec(&["seq", "1", "1500000"]).await;
        assert_eq!(code(&out.end), 0);
        let expected: String = (1..=1_500_000).map(|i| format!("{i}\n")).collect();
        assert!(expected.len() > 10_000_000);
        assert_eq!(
            out.stdout.len(),
            expected.len(),
            "output truncated or padded"
        );
        assert!(out.stdout == expected.as_bytes(), "output differs");
    });
}

#[test]
fn one_connection_carries_many_sessions() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        // Stdin EOF often reaches hulld after `true` has exited: that frame
        // must not break the next session on the same connection.
        for i in 0..100 {
            let out = c
                .exec_collect(spec(&["sh", "-c", &format!("echo {i}")]), b"")
                .await
                .unwrap_or_else(|e| panic!("session {i}: {e}"));
            assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{i}\n"));
        }
        c.status().await.unwrap();
    });
}

#[test]
fn ctrl_c_at_the_cli_reaches_the_command_without_a_terminal() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let mut child = std::process::Command::new(hull_tests::bin_dir().join("hull"))
        .arg("--config")
        .arg(&hull.config)
        .args(["exec", "--", "sh", "-c", "echo started; exec sleep 100"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "started\n");
    std::thread::sleep(std::time::Duration::from_millis(100));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "sleep was not interrupted: {status}"
    );
}

#[test]
fn exec_as_another_user() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let out = hull.hull(&[
        "exec",
        "--user",
        "nobody",
        "--",
        "sh",
        "-c",
        "id -u; echo $HOME",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "65534\n/nonexistent\n"
    );
    let out = hull.hull(&["exec", "--user", "ghost", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user \"ghost\""));
}
