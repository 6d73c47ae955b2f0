//! `hull console` and `hull exec -t` driven through a real terminal: a PTY
//! this test owns plays the user's terminal.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hull_tests::{bin_dir, require_root, TestHull};

struct Terminal {
    master: std::fs::File,
    seen: Arc<Mutex<String>>,
    child: Child,
}

impl Terminal {
    /// Runs `hull ARGS` with a fresh PTY as its controlling terminal.
    fn run(hull: &TestHull, args: &[&str]) -> Terminal {
        let size = nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).unwrap();
        let slave: OwnedFd = pty.slave;
        let mut cmd = Command::new(bin_dir().join("hull"));
        cmd.arg("--config").arg(&hull.config).args(args);
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave.try_clone().unwrap());
        // SAFETY: setsid and ioctl are async-signal-safe; they make the PTY
        // the child's controlling terminal, as a terminal emulator does.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(slave);
        let master = std::fs::File::from(pty.master);
        let mut reader = master.try_clone().unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the last slave fd closes: the session is over.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Terminal {
            master,
            seen,
            child,
        }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
    }

    /// Waits until the output after byte `from` contains `needle`; returns
    /// the output's length, to wait for the next answer after it.
    fn expect(&self, from: usize, needle: &str) -> usize {
        self.wait_for(from, needle, Duration::from_secs(10))
            .unwrap_or_else(|| {
                let seen = self.seen.lock().unwrap();
                panic!(
                    "no {needle:?} on the terminal; it shows {:?}",
                    &seen[from.min(seen.len())..]
                )
            })
    }

    /// Like `expect`, but None after `limit`.
    fn wait_for(&self, from: usize, needle: &str, limit: Duration) -> Option<usize> {
        let deadline = Instant::now() + limit;
        loop {
            {
                let seen = self.seen.lock().unwrap();
                if let Some(pos) = seen.get(from..).and_then(|s| s.find(needle)) {
                    return Some(from + pos + needle.len());
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on our PTY master reads a valid winsize; the
        // kernel sends SIGWINCH to hull, the terminal's foreground process.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0);
    }

    fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().expect("hull exited by signal");
            }
            assert!(Instant::now() < deadline, "hull did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn console_is_a_shell_with_resize_ctrl_c_and_exit_code() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let mut term = Terminal::run(&hull, &["console"]);
    term.type_keys(b"stty size\r");
    let at = term.expect(0, "24 80");
    term.resize(40, 132);
    // SIGWINCH travels hull -> hulld -> the PTY, racing the next command;
    // ask again until the new size shows (bounded), so a slow machine does
    // not fail the test and a lost resize still does.
    let mut resized = None;
    for _ in 0..10 {
        term.type_keys(b"stty size\r");
        // Not waiting for the echo: the shell's line editor may redraw
        // it in pieces (it asks the terminal for the cursor position, and
        // a slow answer makes it repaint), and "40 132" is no part of it.
        resized = term.wait_for(at, "40 132", Duration::from_secs(1));
        if resized.is_some() {
            break;
        }
    }
    let at = resized.unwrap_or_else(|| term.expect(at, "40 132"));
    // Ctrl-C interrupts the foreground job, not the shell.
    term.type_keys(b"sleep 100\r");
    std::thread::sleep(Duration::from_millis(300));
    term.type_keys(&[0x03]);
    term.type_keys(b"echo after-$((40+2))\r");
    let at = term.expect(at, "after-42");
    term.type_keys(b"pwd; hostname\r");
    let at = term.expect(at, "hull-test");
    let _ = at;
    term.type_keys(b"exit 7\r");
    assert_eq!(term.wait(), 7, "hull console exits with the shell's code");
}

#[test]
fn exec_with_a_terminal_returns_the_commands_code() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let mut term = Terminal::run(
        &hull,
        &[
            "exec",
            "-t",
            "-i",
            "--",
            "sh",
            "-c",
            "read x; echo got-$x; exit 4",
        ],
    );
    term.type_keys(b"abc\r");
    term.expect(0, "got-abc");
    assert_eq!(term.wait(), 4);
}

impl Terminal {
    fn seen(&self) -> String {
        self.seen.lock().unwrap().clone()
    }
}

/// Escape sequences that undo what a full-screen program (vim, less, top)
/// turns on, each with the one that turned it on: the alternate screen, a
/// hidden cursor, bracketed paste and mouse reporting.
const RESTORES: [(&str, &str); 4] = [
    ("\x1b[?1049l", "\x1b[?1049h"),
    ("\x1b[?25h", "\x1b[?25l"),
    ("\x1b[?2004l", "\x1b[?2004h"),
    ("\x1b[?1000l", "\x1b[?1000h"),
];

#[test]
fn a_console_a_bounce_ends_leaves_the_terminal_restored_and_says_what_next() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let mut term = Terminal::run(&hull, &["console", "--once"]);
    // What vim does on start: the alternate screen, no cursor, mouse and
    // bracketed paste on.
    term.type_keys(b"printf '\\033[?1049h\\033[?25l\\033[?1000h\\033[?2004h'; echo alt-$((1+1))\r");
    let at = term.expect(0, "alt-2");
    let out = hull.hull(&["bounce"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        term.wait(),
        255,
        "a console the inner stopped under exits 255"
    );
    // The reader thread may still be copying the last bytes.
    std::thread::sleep(Duration::from_millis(200));
    let seen = term.seen();
    let after = &seen[at..];
    let message = after
        .find("session ended")
        .unwrap_or_else(|| panic!("no message after the bounce: {after:?}"));
    for (seq, on) in RESTORES {
        let pos = after[..message]
            .rfind(seq)
            .unwrap_or_else(|| panic!("{seq:?} not written before the message: {after:?}"));
        // Nothing turns it back on after.
        assert!(
            !after[pos..].contains(on),
            "{on:?} after the restore: {after:?}"
        );
    }
    let end = after[message..].trim_end();
    assert!(
        end.contains("hull console"),
        "the message does not say how to get a new shell: {end:?}"
    );
    assert!(
        !after[message..].contains('\x1b'),
        "the message is not the last thing written: {after:?}"
    );
}

#[test]
fn console_gets_a_new_shell_after_a_bounce_with_the_terminal_reset() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let mut term = Terminal::run(&hull, &["console"]);
    term.type_keys(b"printf '\\033[?1049h\\033[?25l'; echo first-$((1+1))\r");
    let at = term.expect(0, "first-2");
    let out = hull.hull(&["bounce"]);
    assert!(out.status.success(), "{out:?}");
    let notice = term.expect(at, "new shell");
    let seen = term.seen();
    for (seq, _) in &RESTORES[..2] {
        assert!(
            seen[at..notice].contains(seq),
            "{seq:?} not written before the notice: {:?}",
            &seen[at..notice]
        );
    }
    // The new shell answers; hull did not exit.
    let mut answered = None;
    for _ in 0..20 {
        term.type_keys(b"echo second-$((2+2))\r");
        answered = term.wait_for(notice, "second-4", Duration::from_millis(500));
        if answered.is_some() {
            break;
        }
    }
    answered.unwrap_or_else(|| term.expect(notice, "second-4"));
    term.type_keys(b"exit 3\r");
    assert_eq!(term.wait(), 3, "the new shell's exit is hull's");
}

#[test]
fn ctrl_backslash_detaches_the_console_and_attach_brings_its_screen_back() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let mut term = Terminal::run(&hull, &["console"]);
    term.type_keys(b"echo before-$((20+1))\r");
    let at = term.expect(0, "before-21");
    term.type_keys(b"\x1c");
    assert_eq!(term.wait(), 0, "a detach is not a failure");
    term.expect(at, "hull console --attach");
    // The shell runs on with nobody attached.
    hull_tests::wait_until(Duration::from_secs(5), "a detached console", || {
        let out = hull.hull(&["--json", "sessions", "list"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .any(|s| s["tty"] == true && s["clients"] == 0)
    });
    let mut back = Terminal::run(&hull, &["console", "--attach"]);
    // The screen as it was: the scrollback is replayed.
    back.expect(0, "before-21");
    back.type_keys(b"echo after-$((30+2))\r");
    back.expect(0, "after-32");
    back.type_keys(b"exit 6\r");
    assert_eq!(back.wait(), 6, "the attached shell's exit is hull's");
}
