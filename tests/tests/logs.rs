//! The log pipeline: every line kept, in order, across bounces and a killed hulld.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use hull_proto::{RestartPolicy, ServiceRequest};
use hull_tests::{bin_dir, block_on, require_root, wait_until, Limits, TestHull};

fn add(hull: &TestHull, name: &str, cmd: &str, restart: RestartPolicy) {
    hull.add_service(name, cmd, &[], None, restart);
}

fn state_of(hull: &TestHull, name: &str) -> String {
    block_on(async {
        hull.client()
            .await
            .services(ServiceRequest::Show(name.into()))
            .await
            .unwrap()[0]
            .state
            .clone()
    })
}

#[test]
fn a_million_numbered_lines_arrive_in_order() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    add(&hull, "counter", "seq 1 1000000", RestartPolicy::Never);
    wait_until(Duration::from_secs(60), "seq to finish", || {
        state_of(&hull, "counter") == "exited"
    });
    let out = hull.hull(&["logs", "counter"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let started = lines.next().unwrap_or_default();
    assert!(started.starts_with("-- counter started (pid "), "{started}");
    let mut expected = 1u64;
    for line in lines {
        assert_eq!(
            line.parse::<u64>().ok(),
            Some(expected),
            "line out of order or lost"
        );
        expected += 1;
    }
    assert_eq!(expected, 1_000_001, "lines lost at the end");
    // --tail and --json.
    let out = hull.hull(&["--json", "logs", "counter", "--tail", "2"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["line"], "1000000");
    assert_eq!(lines[1]["stream"], "stdout");
}

/// Starts `hull logs -f NAME` and hands its stdout lines over a channel.
fn follow(hull: &TestHull, name: &str) -> (std::process::Child, Receiver<String>) {
    let mut follower = Command::new(bin_dir().join("hull"))
        .arg("--config")
        .arg(&hull.config)
        .args(["logs", "-f", name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (follower, rx)
}

fn next_line(rx: &Receiver<String>, what: &str) -> String {
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no line from the follower: expected {what}"))
}

/// `hull logs -f` is tail -f: the last ten lines, then new ones, and the
/// stream marks each start of the service and each bounce.
#[test]
fn logs_follow_starts_at_the_last_lines_and_marks_starts_and_bounces() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    // Each run prints 30 numbered lines, then stays quiet.
    add(
        &hull,
        "hist",
        "n=$(cat /root/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /root/n; \
         for i in $(seq 1 30); do echo run-$n-$i; done; exec sleep 1000",
        RestartPolicy::Always,
    );
    wait_until(Duration::from_secs(10), "the first run's lines", || {
        String::from_utf8_lossy(&hull.hull(&["logs", "hist"]).stdout).contains("run-1-30")
    });
    let (mut follower, rx) = follow(&hull, "hist");
    let first: Vec<String> = (0..10)
        .map(|_| next_line(&rx, "the last ten lines"))
        .collect();
    let want: Vec<String> = (21..=30).map(|i| format!("run-1-{i}")).collect();
    assert_eq!(first, want, "a follow must start at the last ten lines");
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "more than the last ten lines before anything new"
    );

    let bounced = block_on(async { hull.client().await.bounce(0).await.unwrap() });
    assert_eq!(next_line(&rx, "the bounce marker"), "-- inner bounced --");
    let started = next_line(&rx, "the start marker");
    assert!(
        started.starts_with("-- hist started (pid ") && started.ends_with(") --"),
        "{started}"
    );
    assert_eq!(next_line(&rx, "the new run's output"), "run-2-1");
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(bounced.bounces >= 1);

    // The same markers in --json, as records of their own.
    let out = hull.hull(&["--json", "logs", "hist"]);
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<&str> = records
        .iter()
        .filter(|r| r["type"] == "marker")
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["start", "bounce", "start"], "{records:?}");
    assert!(records
        .iter()
        .filter(|r| r["type"] == "marker")
        .all(|r| r["text"].is_string() && r["ts_ms"].is_i64()));
}

/// The records of `source` in its segment files on disk, as (stream, line).
fn on_disk(hull: &TestHull, source: &str) -> Vec<(String, String)> {
    let dir = hull.state_dir.join("logs").join(source);
    let mut segments: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    segments.sort();
    segments
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .map(|r| {
                    let field = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                    (field("stream"), field("line"))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Catches a log store that leaves lines in its buffer until a reader asks
/// for them: nothing here reads the log (`hull logs` and `services show`
/// flush it first) before hulld is killed, so only the 200 ms flusher can
/// have put the lines on disk, where they are read straight from the
/// segment files. The wait after the lines are written is a bound well
/// past the flush interval, not a measurement.
#[test]
fn logs_survive_a_killed_hulld_and_stderr_stays_apart() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    add(
        &hull,
        "both",
        "echo to-out; echo to-err >&2; touch /root/written; exec sleep 1000",
        RestartPolicy::Always,
    );
    wait_until(Duration::from_secs(10), "the lines written", || {
        block_on(hull.exec(&["test", "-e", "/root/written"])).end
            == hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0))
    });
    std::thread::sleep(Duration::from_millis(600));
    hull.kill9_hulld();
    let records = on_disk(&hull, "both");
    for want in [("Stdout", "to-out"), ("Stderr", "to-err")] {
        assert!(
            records
                .iter()
                .any(|(s, l)| (s.as_str(), l.as_str()) == want),
            "{want:?} did not reach the disk before the kill: {records:?}"
        );
    }

    // A new hulld serves them, the streams apart.
    hull.spawn_hulld();
    hull.wait_running(Duration::from_secs(20));
    let out = hull.hull(&["logs", "both", "--stream", "stdout"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("to-out"), "{text}");
    assert!(!text.contains("to-err"), "{text}");
    let missing = hull.hull(&["logs", "ghost"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no logs for \"ghost\""));
}

#[test]
fn an_over_long_line_is_split_between_characters() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    // 1 + 2 * 50000 bytes: the 64 KiB split point falls inside a character.
    add(
        &hull,
        "wide",
        "awk 'BEGIN { printf \"a\"; for (i = 0; i < 50000; i++) printf \"\\303\\251\"; print \"\" }'",
        RestartPolicy::Never,
    );
    wait_until(Duration::from_secs(20), "the line to be logged", || {
        state_of(&hull, "wide") == "exited"
    });
    let out = hull.hull(&["--json", "logs", "wide"]);
    let parts: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["type"] != "marker")
        .map(|r| r["line"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(parts.len(), 2, "expected one split");
    assert!(
        parts.iter().all(|p| !p.contains('\u{FFFD}')),
        "a character was cut"
    );
    let expected = format!("a{}", "é".repeat(50000));
    assert_eq!(parts.concat(), expected);
}

#[test]
fn since_keeps_only_recent_lines() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    add(
        &hull,
        "slow",
        "echo early; sleep 3; echo late; exec sleep 1000",
        RestartPolicy::Never,
    );
    wait_until(Duration::from_secs(15), "the late line", || {
        String::from_utf8_lossy(&hull.hull(&["logs", "slow"]).stdout).contains("late")
    });
    let recent = hull.hull(&["logs", "slow", "--since", "2s"]);
    assert_eq!(String::from_utf8_lossy(&recent.stdout), "late\n");
    let all = hull.hull(&["logs", "slow", "--since", "1h"]);
    let all = String::from_utf8_lossy(&all.stdout);
    let (started, rest) = all.split_once('\n').unwrap();
    assert!(started.starts_with("-- slow started (pid "), "{all}");
    assert_eq!(rest, "early\nlate\n");
    let bad = hull.hull(&["logs", "slow", "--since", "soon"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a duration"));
}

#[test]
fn non_interactive_exec_output_is_kept_and_terminal_sessions_are_not() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let out = hull.hull(&[
        "exec",
        "--",
        "sh",
        "-c",
        "echo exec-out; printf 'no-newline' >&2",
    ]);
    assert!(out.status.success());
    block_on(async {
        let mut c = hull.client().await;
        let mut spec = hull_tests::spec(&["echo", "tty-session"]);
        spec.tty = Some(hull_proto::WinSize { rows: 24, cols: 80 });
        c.exec_collect(spec, b"").await.unwrap();
    });
    // The exec's own lines; its start and end are marker lines.
    let lines = |stream: &str| {
        let logs = hull.hull(&["logs", "exec", "--stream", stream]);
        String::from_utf8_lossy(&logs.stdout)
            .lines()
            .filter(|l| !l.starts_with("-- exec "))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    assert_eq!(lines("stdout"), "exec-out\n");
    assert_eq!(lines("stderr"), "no-newline\n");
    let add = hull.hull(&["services", "add", "exec", "--cmd", "true"]);
    assert!(
        !add.status.success(),
        "the exec log source was taken by a service"
    );
}

#[test]
fn the_oldest_lines_go_first_at_the_cap_and_the_drop_is_recorded() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        tables: "[logs]\nsegment_size = \"1M\"\nmax_per_source = \"4M\"\n".into(),
        ..Limits::default()
    });
    // About 15 MB of records against the 4 MiB cap.
    add(
        &hull,
        "flood",
        "yes 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789 | head -n 100000; echo the-end",
        RestartPolicy::Never,
    );
    wait_until(Duration::from_secs(120), "the flood to end", || {
        state_of(&hull, "flood") == "exited"
    });
    let last = hull.hull(&["logs", "flood", "--tail", "1", "--stream", "stdout"]);
    assert_eq!(String::from_utf8_lossy(&last.stdout), "the-end\n");
    let notes = hull.hull(&["logs", "flood", "--stream", "stderr"]);
    let notes = String::from_utf8_lossy(&notes.stdout);
    assert!(
        notes.contains("dropped") && notes.contains("capped at 4 MiB"),
        "{notes}"
    );
    let size: u64 = std::fs::read_dir(hull.state_dir.join("logs/flood"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        size <= 5 << 20,
        "the log grew past its cap and one segment: {size} bytes"
    );
    // The newest lines are all there: the cap dropped whole old segments,
    // not lines from the middle.
    let tail = hull.hull(&["logs", "flood", "--tail", "1000", "--stream", "stdout"]);
    let tail = String::from_utf8_lossy(&tail.stdout);
    assert_eq!(
        tail.lines().count(),
        1000,
        "{}",
        &tail[..200.min(tail.len())]
    );
}

#[test]
fn hullds_own_log_is_a_source() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async { hull.client().await.bounce(0).await.unwrap() });
    wait_until(Duration::from_secs(5), "the bounce in hulld's log", || {
        let out = hull.hull(&["logs", "--daemon"]);
        String::from_utf8_lossy(&out.stdout).contains("inner bounced")
    });
    let own = hull.hull(&["logs", "--daemon"]);
    assert!(String::from_utf8_lossy(&own.stdout).contains("hulld listening"));
    let out = hull.hull(&["logs"]);
    assert!(
        !out.status.success(),
        "hull logs without a name or --daemon"
    );
}

#[test]
fn a_full_log_disk_never_blocks_the_service_and_the_loss_is_recorded() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        logs_tmpfs: Some("3M"),
        tables: "[logs]\nsegment_size = \"1M\"\nmax_per_source = \"64M\"\n".into(),
        ..Limits::default()
    });
    // About 15 MB into a 3 MiB disk; then it waits for the test.
    add(
        &hull,
        "flood",
        "yes 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789 | head -n 100000; touch /tmp/flooded; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo after-the-full-disk",
        RestartPolicy::Never,
    );
    // The service got through all of its output although most of it could
    // not be stored.
    wait_until(Duration::from_secs(60), "the flood to be written", || {
        block_on(hull.exec(&["test", "-e", "/tmp/flooded"])).end
            == hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0))
    });
    // hulld answers while its log disk is full.
    hull.wait_running(Duration::from_secs(5));
    // Room again: the next line is stored, preceded by the count of lost ones.
    let logs = hull.state_dir.join("logs");
    nix::mount::mount(
        None::<&str>,
        &logs,
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT,
        Some("size=64M"),
    )
    .expect("grow the log tmpfs");
    block_on(hull.sh("touch /tmp/go"));
    wait_until(
        Duration::from_secs(15),
        "the line after the full disk",
        || {
            let out = hull.hull(&["logs", "flood", "--tail", "1", "--stream", "stdout"]);
            String::from_utf8_lossy(&out.stdout) == "after-the-full-disk\n"
        },
    );
    let notes = hull.hull(&["logs", "flood", "--stream", "stderr"]);
    let notes = String::from_utf8_lossy(&notes.stdout);
    let lost: u64 = notes
        .lines()
        .filter_map(|l| {
            l.strip_prefix("hull: ")?
                .split_once(" log lines were lost")?
                .0
                .parse::<u64>()
                .ok()
        })
        .sum();
    let stored = hull
        .hull(&["logs", "flood", "--stream", "stdout"])
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"0123"))
        .count() as u64;
    // Every line is either stored or counted as lost, none silently gone.
    assert!(lost > 0, "nothing was lost to a full disk: {notes}");
    assert_eq!(stored + lost, 100_000, "{stored} stored + {lost} lost");
}

/// `hull exec -i -- ARGS` with `input` as its stdin.
fn exec_with_input(
    hull: &TestHull,
    args: &[&str],
    input: &std::path::Path,
) -> std::process::Output {
    Command::new(bin_dir().join("hull"))
        .arg("--config")
        .arg(&hull.config)
        .args(["exec", "-i"])
        .args(args)
        .stdin(std::fs::File::open(input).unwrap())
        .output()
        .expect("run hull exec")
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().metadata().unwrap().len()).sum())
        .unwrap_or(0)
}

#[test]
fn a_binary_exec_is_logged_as_its_size_and_hash_not_as_junk() {
    use sha2::Digest;
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    // 3 MB of bytes that are not UTF-8 (an xorshift stream).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..3_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    assert!(std::str::from_utf8(&data).is_err());
    let input = hull.dir.path().join("binary-input");
    std::fs::write(&input, &data).unwrap();
    let out = exec_with_input(&hull, &["--", "cat"], &input);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout == data, "the exec's own output was changed");
    let logs = hull.hull(&["logs", "exec"]);
    let text = String::from_utf8(logs.stdout).expect("hull logs prints UTF-8");
    let hash = format!("{:x}", sha2::Sha256::digest(&data));
    assert!(
        text.contains("3000000 bytes") && text.contains(&hash),
        "the log does not give the output's size and sha256 {hash}: {text:.2000}"
    );
    assert!(
        !text.contains('\u{FFFD}'),
        "binary output was stored as replacement characters: {text:.500}"
    );
    let stored = dir_size(&hull.state_dir.join("logs/exec"));
    assert!(
        stored < 64 * 1024,
        "3 MB of binary output took {stored} bytes of the exec log"
    );
}

#[test]
fn each_exec_has_a_record_with_its_argv_exit_and_duration() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let out = hull.hull(&[
        "exec",
        "--",
        "sh",
        "-c",
        "echo hello-exec; sleep 0.2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let logs = hull.hull(&["--json", "logs", "exec"]);
    assert!(logs.status.success(), "{logs:?}");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&logs.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let end = records
        .iter()
        .find(|r| r["event"] == "exec_end")
        .unwrap_or_else(|| panic!("no exec_end record: {records:?}"));
    let exec = &end["exec"];
    assert_eq!(
        exec["argv"],
        serde_json::json!(["sh", "-c", "echo hello-exec; sleep 0.2; exit 3"]),
        "{end}"
    );
    assert_eq!(exec["exit_code"], 3, "{end}");
    let ms = exec["duration_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("{end}"));
    assert!(ms >= 200, "the exec slept 200 ms but lasted {ms} ms: {end}");
    let id = exec["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id: {end}"));
    let line = records
        .iter()
        .find(|r| r["line"] == "hello-exec")
        .unwrap_or_else(|| panic!("the output line is missing: {records:?}"));
    assert_eq!(line["exec_id"], id, "{line}");
    // A second exec has another id, and the plain log names both.
    hull.hull(&["exec", "--", "true"]);
    let plain = hull.hull(&["logs", "exec"]);
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(
        plain.contains(&format!("exec {id}")) && plain.contains(&format!("exec {}", id + 1)),
        "{plain}"
    );
}

#[test]
fn exec_no_log_leaves_nothing_in_the_exec_log() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    assert!(hull.hull(&["exec", "--", "echo", "kept"]).status.success());
    let out = hull.hull(&["exec", "--no-log", "--", "echo", "secret-output"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "secret-output\n");
    let logs = hull.hull(&["logs", "exec"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("kept"), "{text}");
    assert!(
        !text.contains("secret"),
        "--no-log left the exec in the log: {text}"
    );
}

#[test]
fn a_big_exec_is_capped_apart_and_leaves_service_logs_alone() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        tables: "[logs]\nsegment_size = \"64K\"\nmax_per_source = \"64M\"\nmax_exec = \"256K\"\n"
            .into(),
        ..Limits::default()
    });
    add(
        &hull,
        "keeper",
        "echo first-service-line; exec sleep 1000",
        RestartPolicy::Never,
    );
    wait_until(Duration::from_secs(10), "the service's first line", || {
        String::from_utf8_lossy(&hull.hull(&["logs", "keeper"]).stdout)
            .contains("first-service-line")
    });
    // About 4 MB of text, sixteen times the exec cap.
    let out = hull.hull(&[
        "exec",
        "--",
        "sh",
        "-c",
        "yes 0123456789012345678901234567890123456789 | head -n 100000",
    ]);
    assert!(out.status.success());
    let exec = dir_size(&hull.state_dir.join("logs/exec"));
    assert!(
        exec <= (256 + 64 + 16) * 1024,
        "the exec log grew past its own cap: {exec} bytes"
    );
    let service = String::from_utf8_lossy(&hull.hull(&["logs", "keeper"]).stdout).into_owned();
    assert!(service.contains("first-service-line"), "{service}");
    let notes = String::from_utf8_lossy(&hull.hull(&["logs", "exec", "--stream", "stderr"]).stdout)
        .into_owned();
    assert!(notes.contains("logs.max_exec"), "{notes}");
}

/// Output is the inner's to choose: terminal escape sequences in it (a
/// title change, a screen clear, an OSC 52 clipboard write) must reach the
/// reader of `hull logs` as visible text, never as commands to their
/// terminal. `--json` keeps the exact text.
#[test]
fn escape_sequences_in_output_are_shown_not_obeyed() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let out = hull.hull(&[
        "exec",
        "--",
        "printf",
        "title\\033]0;pwned\\007 clear\\033[2J csi\\302\\233J end\\n",
    ]);
    assert!(out.status.success(), "{out:?}");
    let logs = hull.hull(&["logs", "exec"]);
    let text = String::from_utf8(logs.stdout).expect("hull logs prints UTF-8");
    let line = text
        .lines()
        .find(|l| l.contains("title") && !l.starts_with("--"))
        .unwrap_or_else(|| panic!("no output line in {text}"));
    assert!(
        !line.contains(['\u{1b}', '\u{7}', '\u{9b}']),
        "control characters reached the terminal: {line:?}"
    );
    assert!(line.contains("\\x1b]0;pwned\\x07"), "{line:?}");
    let json = hull.hull(&["--json", "logs", "exec"]);
    let text = String::from_utf8(json.stdout).unwrap();
    assert!(text.contains("\\u001b]0;pwned\\u0007"), "{text}");
}
