//! The `hull` command line as a script or a person meets it: exit codes,
//! `--json`, stdin without a terminal, closed pipes, users without root,
//! help and the shapes of its output.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hull_tests::{bin_dir, block_on, require_root, wait_until, TestHull};
use serde_json::Value;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd` to its end, or kills it after `limit` and fails: a command
/// that hangs is the bug some of these tests are about.
fn run_within(mut cmd: Command, limit: Duration, what: &str) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hull");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

fn hull_cmd(hull: &TestHull, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_dir().join("hull"));
    cmd.arg("--config").arg(&hull.config).args(args);
    cmd
}

/// The one JSON object a `--json` command printed on stderr for its error.
fn json_error(out: &Output) -> Value {
    let stderr = text(&out.stderr);
    serde_json::from_str(stderr.trim())
        .unwrap_or_else(|e| panic!("stderr is not one JSON object ({e}): {stderr:?}"))
}

#[test]
fn exec_before_up_exits_125_with_a_plain_reason() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hull.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nsocket = {:?}\n",
            dir.path().join("state"),
            dir.path().join("hull.sock")
        ),
    )
    .unwrap();
    let out = Command::new(bin_dir().join("hull"))
        .arg("--config")
        .arg(&config)
        .args(["exec", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("hulld is not running"),
        "{}",
        text(&out.stderr)
    );
    let out = Command::new(bin_dir().join("hull"))
        .arg("--config")
        .arg(&config)
        .args(["--json", "exec", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(json_error(&out)["code"], "not_running");
    // A usage error is hull's too: not 2, which a command may return.
    for args in [
        &["exec"][..],
        &["exec", "--linger", "soon", "--", "true"],
        &["console", "extra"],
    ] {
        let out = Command::new(bin_dir().join("hull"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(125),
            "hull {args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = Command::new(bin_dir().join("hull"))
        .arg("statu")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_exec_racing_bounces_runs_on_the_new_inner_or_exits_255() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (done, execs) = (AtomicBool::new(false), AtomicUsize::new(0));
    let results = std::thread::scope(|s| {
        s.spawn(|| {
            // At least 15 bounces, and on until 30 execs met them (a bounce
            // can be quicker than starting `hull`); at most 300.
            let mut bounces = 0;
            while bounces < 15 || (execs.load(Ordering::SeqCst) < 30 && bounces < 300) {
                let out = hull.hull(&["bounce"]);
                assert!(out.status.success(), "bounce: {}", text(&out.stderr));
                bounces += 1;
            }
            done.store(true, Ordering::SeqCst);
        });
        let threads: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut results = Vec::new();
                    while !done.load(Ordering::SeqCst) {
                        results.push(hull.hull(&["exec", "--", "echo", "ran"]));
                        execs.fetch_add(1, Ordering::SeqCst);
                    }
                    results
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let ended = results
        .iter()
        .filter(|o| o.status.code() == Some(255))
        .count();
    eprintln!(
        "{} execs during bounces, {ended} ended by one",
        results.len()
    );
    for out in &results {
        let stderr = text(&out.stderr);
        match out.status.code() {
            Some(0) => assert_eq!(text(&out.stdout), "ran\n"),
            Some(255) => {
                assert!(stderr.starts_with("hull: "), "{stderr}");
                for debug in ["unexpected", "InnerStopped", "{"] {
                    assert!(!stderr.contains(debug), "debug text in: {stderr}");
                }
            }
            other => panic!("exec during bounces exited {other:?}: {stderr}"),
        }
    }
}

#[test]
fn json_exec_prints_one_object_and_errors_are_objects_with_a_code() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let out = hull.hull(&[
        "--json",
        "exec",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {:?}", text(&out.stdout)));
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["stdout"], "out\n");
    assert_eq!(v["stderr"], "err\n");
    assert!(v["duration_ms"].as_f64().is_some(), "{v}");
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    // Its id in the exec log, which has its output.
    let id = v["exec_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no exec_id: {v}"));
    let logged = text(&hull.hull(&["logs", &format!("exec:{id}")]).stdout);
    assert!(logged.contains("\nout\n"), "{logged}");
    let out = hull.hull(&["--json", "exec", "--no-log", "--", "true"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exec_id"], Value::Null, "{v}");

    let out = hull.hull(&["--json", "exec", "--", "sh", "-c", "printf '\\377\\376'"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stdout_base64"], "//4=", "{v}");
    assert!(v.get("stdout").is_none(), "{v}");
    assert_eq!(v["stderr"], "");

    let out = hull.hull(&["--json", "exec", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["exit_code"].as_i64(), v["signal"].as_i64()),
        (Some(137), Some(9))
    );

    let out = hull.hull(&["--json", "exec", "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(json_error(&out)["code"], "command_not_found");

    let out = hull.hull(&["--json", "checkpoint", "restore", "v99"]);
    assert_eq!(out.status.code(), Some(1));
    let e = json_error(&out);
    assert_eq!(e["code"], "not_found");
    assert!(e["message"].as_str().unwrap().contains("v99"), "{e}");
    assert!(out.stdout.is_empty());

    let out = hull.hull(&["--json", "services", "stop", "nope"]);
    assert_eq!(json_error(&out)["code"], "not_found");

    let out = hull.hull(&["--json", "no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json_error(&out)["code"], "usage");
}

#[test]
fn a_terminal_is_not_asked_of_a_pipe_or_dev_null() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let mut cmd = hull_cmd(&hull, &["exec", "-it", "--", "sh"]);
    let mut script = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut script, b"echo piped-$((40 + 2))\n").unwrap();
    std::io::Seek::rewind(&mut script).unwrap();
    // A real pipe, as `echo ... | hull exec -it -- sh` has.
    let (read, write) = nix::unistd::pipe().unwrap();
    std::io::Write::write_all(&mut std::fs::File::from(write), b"echo piped-$((40 + 2))\n")
        .unwrap();
    cmd.stdin(Stdio::from(read));
    let out = run_within(
        cmd,
        Duration::from_secs(20),
        "exec -it with a pipe on stdin",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("piped-42"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("not a terminal"),
        "{}",
        text(&out.stderr)
    );

    let mut cmd = hull_cmd(&hull, &["exec", "-t", "--", "sh", "-c", "cat; echo done"]);
    cmd.stdin(Stdio::from(script));
    let out = run_within(cmd, Duration::from_secs(20), "exec -t with a file on stdin");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let mut cmd = hull_cmd(&hull, &["console"]);
    cmd.stdin(Stdio::null());
    let out = run_within(cmd, Duration::from_secs(20), "console </dev/null");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    hull.add_service(
        "talker",
        "echo hello",
        &[],
        None,
        hull_proto::RestartPolicy::Never,
    );
    assert!(hull.hull(&["checkpoint", "create"]).status.success());
    for args in [
        &["status"][..],
        &["ports"],
        &["ingress"],
        &["services", "list"],
        &["checkpoint", "list"],
        &["logs", "--daemon"],
        &["exec", "--", "seq", "1", "100000"],
        &["--json", "status"],
    ] {
        // The reader is gone before hull writes a byte: `hull status | true`
        // with `true` quicker than hull.
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = hull_cmd(&hull, args)
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            matches!(out.status.code(), Some(0) | Some(141)),
            "hull {args:?} into a closed pipe exited {:?}: {}",
            out.status,
            text(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "hull {args:?} into a closed pipe said: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_closed_stderr_is_no_crash_either() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    // `hull ... 2>&1 | true`: both streams into a pipe nobody reads.
    for (args, code) in [
        (&["--json", "no-such-command"][..], 2),
        (&["checkpoint", "restore", "v99"], 1),
        (&["exec", "--", "sh", "-c", "echo to-stderr >&2; exit 7"], 7),
    ] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = hull_cmd(&hull, args)
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(write))
            .status()
            .unwrap();
        assert_eq!(out.code(), Some(code), "hull {args:?} with stderr closed");
    }
}

/// `setpriv` to nobody, running the copy of `hull` in `dir` (the build's
/// own may be in a directory nobody can enter) with the config there.
fn as_nobody(dir: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(dir.join("hull"))
        .arg("--config")
        .arg(dir.join("hull.toml"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv (util-linux)")
}

#[test]
fn an_unprivileged_user_is_told_hull_needs_root() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    // The test's own dir is 0700, as /run/hull's socket is 0600: nobody may
    // read a copy of the config and run a copy of hull, not the socket.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = open.path().join("hull.toml");
    std::fs::copy(&hull.config, &config).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::copy(bin_dir().join("hull"), open.path().join("hull")).unwrap();
    for (args, code) in [
        (&["down"][..], 4),
        (&["status"], 4),
        (&["up"], 4),
        (&["exec", "--", "true"], 125),
    ] {
        let out = as_nobody(open.path(), args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "hull {args:?}: {stderr}");
        assert!(
            stderr.contains("hull needs root (the control socket is 0600)"),
            "hull {args:?}: {stderr}"
        );
        for wrong in ["not running", "hull up", "building"] {
            assert!(!stderr.contains(wrong), "hull {args:?}: {stderr}");
        }
    }
    let out = as_nobody(open.path(), &["--json", "status"]);
    assert_eq!(json_error(&out)["code"], "needs_root");
    assert!(
        hull.hull(&["status"]).status.success(),
        "hulld still runs for root"
    );
}

#[test]
fn what_is_printed_for_the_user_goes_to_stdout() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    hull.add_service(
        "grumbler",
        "echo to-stderr >&2; sleep 1000",
        &[],
        None,
        hull_proto::RestartPolicy::Never,
    );
    wait_until(Duration::from_secs(10), "the service's line", || {
        text(&hull.hull(&["logs", "grumbler"]).stdout).contains("to-stderr")
    });
    let out = hull.hull(&["logs", "--daemon"]);
    assert!(
        text(&out.stdout).contains("hulld listening"),
        "stdout: {}",
        text(&out.stdout)
    );
    assert!(out.stderr.is_empty(), "stderr: {}", text(&out.stderr));
    let out = hull.down();
    assert!(
        text(&out.stdout).contains("stopped hulld"),
        "stdout: {} stderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn json_output_is_plain_objects_with_snake_case_fields() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    hull.add_service(
        "crasher",
        "echo oops >&2; exit 2",
        &[],
        None,
        hull_proto::RestartPolicy::Never,
    );
    wait_until(Duration::from_secs(10), "crasher to exit", || {
        let out = hull.hull(&["--json", "services", "list"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["state"] != "running"
            && v[0]["state"] != "starting"
            && v[0]["last_exit"] != Value::Null
    });
    let out = hull.hull(&["--json", "services", "show", "crasher"]);
    let show: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(show.is_object(), "show is not an object: {show}");
    assert_eq!(show["last_exit"], serde_json::json!({ "exit_code": 2 }));

    assert!(hull.hull(&["checkpoint", "create"]).status.success());
    let out = hull.hull(&["--json", "checkpoint", "list"]);
    let listing: Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = &listing["checkpoints"][0]["services"];
    assert!(services.is_array(), "services is not an array: {services}");
    assert_eq!(services[0]["name"], "crasher");

    let out = hull.hull(&["--json", "logs", "crasher"]);
    let line: Value = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["type"] == "line")
        .expect("an output line");
    assert_eq!(line["stream"], "stderr", "{line}");
    assert_eq!(line["line"], "oops");
}

#[test]
fn help_explains_every_argument() {
    if !require_root() {
        return;
    }
    for command in [
        "up",
        "status",
        "exec",
        "console",
        "bounce",
        "down",
        "checkpoint create",
        "checkpoint restore",
        "checkpoint list",
        "checkpoint delete",
        "services add",
        "services list",
        "services show",
        "services start",
        "services stop",
        "services restart",
        "services remove",
        "logs",
        "ports",
        "ingress",
        "image build",
    ] {
        let args: Vec<&str> = command.split(' ').chain(["-h"]).collect();
        let out = Command::new(bin_dir().join("hull"))
            .args(&args)
            .output()
            .unwrap();
        let help = text(&out.stdout);
        assert!(
            !help.starts_with("Usage:"),
            "hull {command} has no description:\n{help}"
        );
        // "  -x, --name <V>  What it does": the name, two spaces, the help.
        for line in help.lines().filter(|l| {
            let item = l.trim_start();
            l.starts_with("  ") && (item.starts_with('-') || item.starts_with('<'))
        }) {
            let described = line
                .trim()
                .split_once("  ")
                .is_some_and(|(_, help)| !help.trim().is_empty());
            assert!(described, "hull {command}: {line:?} has no help:\n{help}");
        }
    }
    let add = text(
        &Command::new(bin_dir().join("hull"))
            .args(["services", "add", "-h"])
            .output()
            .unwrap()
            .stdout,
    );
    assert!(add.contains("--cwd <DIR>"), "{add}");
}

#[test]
fn help_inside_the_inner_offers_only_what_works_there() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let help = block_on(hull.sh("/run/hull/bin/hull --help"));
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.contains(&"services"), "{help}");
    for vm_only in ["up", "down", "image", "exec", "bounce", "checkpoint"] {
        assert!(
            !commands.contains(&vm_only),
            "`{vm_only}` offered in:\n{help}"
        );
    }
    assert!(!help.contains("hull up"), "{help}");
    let out = block_on(hull.exec(&["/run/hull/bin/hull", "up"]));
    assert!(
        text(&out.stderr).contains("not inside the inner"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_chain_of_checkpoints_lists_flat_and_branches_only_where_it_forks() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    for i in 1..=20 {
        let out = hull.hull(&["checkpoint", "create", "-m", &format!("step {i}")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // In characters: the branch lines' box drawing is several bytes each.
    let column = |line: &str| line.chars().position(|c| c == 'v').unwrap();
    let out = text(&hull.hull(&["checkpoint", "list"]).stdout);
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("step ")).collect();
    assert_eq!(rows.len(), 20, "{out}");
    assert!(
        rows.iter().all(|l| column(l) == column(rows[0])),
        "a linear chain is indented:\n{out}"
    );
    // Back to v10 and on from there: v10 now has two children.
    assert!(hull
        .hull(&["checkpoint", "restore", "v10"])
        .status
        .success());
    assert!(hull
        .hull(&["checkpoint", "create", "-m", "other way"])
        .status
        .success());
    let out = text(&hull.hull(&["checkpoint", "list"]).stdout);
    let lines: Vec<&str> = out.lines().collect();
    let at = |comment: &str| {
        lines
            .iter()
            .position(|l| l.trim_end().ends_with(comment))
            .unwrap_or_else(|| panic!("no {comment:?} in:\n{out}"))
    };
    assert_eq!(
        column(lines[at("step 10")]),
        column(lines[at("step 1")]),
        "the chain before the fork is flat:\n{out}"
    );
    for branch in ["step 11", "other way"] {
        assert!(
            column(lines[at(branch)]) > column(lines[at("step 10")]),
            "{branch} is not drawn as a branch:\n{out}"
        );
    }
    assert_eq!(
        column(lines[at("step 20")]),
        column(lines[at("step 11")]),
        "the chain after the fork is flat:\n{out}"
    );
}

#[test]
fn output_of_processes_left_behind_is_kept_up_to_the_linger() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let script = "(sleep 0.2; echo a; sleep 1; echo b) & echo early";
    let out = hull.hull(&["exec", "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "early\na\nb\n");
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));

    let script = "(sleep 0.2; echo a; sleep 5; echo b) & echo early";
    let out = hull.hull(&["exec", "--linger", "2s", "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "early\na\n");
    assert!(
        text(&out.stderr).contains("output cut") && text(&out.stderr).contains("--linger"),
        "{}",
        text(&out.stderr)
    );
    let out = hull.hull(&[
        "--json",
        "exec",
        "--linger",
        "0s",
        "--",
        "sh",
        "-c",
        "sleep 5 & echo x",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["output_cut"], true, "{v}");
}

#[test]
fn a_timeout_kills_the_process_group_and_exits_124() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let out = hull.hull(&[
        "exec",
        "--timeout",
        "1s",
        "--",
        "sh",
        "-c",
        "sleep 300 & echo started; sleep 301; echo never",
    ]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "started\n");
    assert!(
        text(&out.stderr).contains("timed out after 1 s"),
        "{}",
        text(&out.stderr)
    );
    wait_until(Duration::from_secs(5), "the process group to die", || {
        hull_tests::inner_pids_running(&hull, &["sleep", "300"]).is_empty()
            && hull_tests::inner_pids_running(&hull, &["sleep", "301"]).is_empty()
    });

    let out = hull.hull(&["--json", "exec", "--timeout", "200ms", "--", "sleep", "302"]);
    assert_eq!(out.status.code(), Some(124));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["exit_code"].as_i64(), v["timed_out"].as_bool()),
        (Some(124), Some(true)),
        "{v}"
    );

    let out = hull.hull(&["exec", "--timeout", "30s", "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a timeout that does not pass changes nothing"
    );
}

#[test]
fn exec_detach_prints_an_id_whose_output_logs_exec_id_reads() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let out = hull.hull(&[
        "exec",
        "--detach",
        "--",
        "sh",
        "-c",
        "echo detached-start; sleep 3; echo detached-end",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let id: u64 = text(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("stdout is not an id ({e}): {out:?}"));
    // The output lines of exec:ID (its start record quotes the command).
    let source = format!("exec:{id}");
    let lines = || -> Vec<String> {
        text(&hull.hull(&["logs", &source]).stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert!(
        !lines().contains(&"detached-end".to_string()),
        "hull exec --detach waited for the command"
    );
    assert!(hull
        .hull(&["exec", "--", "echo", "another-exec"])
        .status
        .success());
    wait_until(Duration::from_secs(15), "the detached exec's end", || {
        lines().contains(&"detached-end".to_string())
    });
    let own = lines().join("\n");
    assert!(own.contains("detached-start"), "{own}");
    assert!(
        !own.contains("another-exec"),
        "exec:{id} shows another exec: {own}"
    );
    let out = hull.hull(&["--json", "exec", "--detach", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["id"].as_u64(), Some(id + 2), "{v}");
    // A detached command has no terminal and no stdin to read.
    let out = hull.hull(&["exec", "--detach", "-t", "--", "sh"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
}

/// `hull vm` drives QEMU on this machine: the HULL_URL and HULL_TOKEN that
/// `set -a; . DIR/api.env` puts in the environment (as the docs say to)
/// must not stop `hull vm status` or `hull vm stop` from working.
#[test]
fn hull_vm_works_with_the_vms_api_env_sourced() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin_dir().join("hull"))
        .args(["--json", "vm", "status"])
        .arg(dir.path())
        .env("HULL_URL", "http://127.0.0.1:9")
        .env("HULL_TOKEN", "hull_00000000_00")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["running"], false, "{status}");
}
