//! `hull cp`: files between this machine and the inner over hulld's own
//! `Files` requests, on the control socket and through `--url`, within
//! what the token's scope allows.

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use hull_tests::{block_on, remote, require_root, run_with_input, TestHull};

fn local(hull: &TestHull, args: &[&str], stdin: &[u8]) -> Output {
    let mut command = hull.hull_command();
    command.args(args);
    run_with_input(command, stdin)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Bytes no two chunks of which are alike, so a chunk sent twice, lost
/// or out of order shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Runs `hull --json ARGS`, which must succeed: what it printed.
fn copied(hull: &TestHull, args: &[&str]) -> serde_json::Value {
    let mut command = hull.hull_command();
    command.arg("--json").args(args);
    let out = run_with_input(command, b"");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn inner_out(hull: &TestHull, script: &str) -> String {
    let out = block_on(hull.exec(&["sh", "-c", script]));
    text(&out.stdout).trim().to_string()
}

#[test]
fn a_file_goes_in_and_comes_back_whole_with_its_mode() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let dir = tempfile::tempdir().unwrap();
    // Several chunks of the protocol and of the local reads, and a tail.
    let data = pattern(3 * 1024 * 1024 + 12_345);
    let src = dir.path().join("big.bin");
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();

    let out = local(
        &hull,
        &["--json", "cp", src.to_str().unwrap(), ":/tmp/big.bin"],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bytes"], data.len(), "{v}");
    assert_eq!(v["destination"], ":/tmp/big.bin", "{v}");
    assert_eq!(
        inner_out(&hull, "stat -c '%s %a' /tmp/big.bin"),
        format!("{} 750", data.len())
    );

    // Back out, into a directory under its own name.
    let back = dir.path().join("back");
    std::fs::create_dir(&back).unwrap();
    let out = local(&hull, &["cp", ":/tmp/big.bin", back.to_str().unwrap()], b"");
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("copied :/tmp/big.bin"),
        "{out:?}"
    );
    let got = back.join("big.bin");
    assert!(std::fs::read(&got).unwrap() == data, "the copy differs");
    assert_eq!(
        std::fs::metadata(&got).unwrap().permissions().mode() & 0o777,
        0o750
    );

    // Into an inner directory, and to stdout.
    let out = local(&hull, &["cp", src.to_str().unwrap(), ":/root"], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        inner_out(&hull, "cmp /root/big.bin /tmp/big.bin && echo same"),
        "same"
    );
    let os_release = inner_out(&hull, "cat /etc/os-release");
    let out = local(&hull, &["cp", ":/etc/os-release", "-"], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout).trim(), os_release);
    // From stdin.
    let out = local(&hull, &["cp", "-", ":/tmp/from-stdin"], b"piped in\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(inner_out(&hull, "cat /tmp/from-stdin"), "piped in");
}

#[test]
fn a_copy_that_fails_says_why_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().to_str().unwrap();

    let out = local(&hull, &["--json", "cp", ":/no/such/file", dest], b"");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert!(
        err["message"].as_str().unwrap().contains("/no/such/file"),
        "{err}"
    );
    let out = local(&hull, &["cp", ":/etc", dest], b"");
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("directory"), "{out:?}");
    // A device node the inner can name is never opened.
    let out = local(&hull, &["cp", ":/dev/zero", dest], b"");
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a failed copy left files behind"
    );

    // Into a directory that does not exist: refused, nothing made.
    let src = dir.path().join("a.txt");
    std::fs::write(&src, b"a").unwrap();
    let out = local(
        &hull,
        &["cp", src.to_str().unwrap(), ":/no/such/dir/a.txt"],
        b"",
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("/no/such/dir/a.txt"), "{out:?}");
    assert_eq!(
        inner_out(&hull, "test -e /no && echo made || echo absent"),
        "absent"
    );

    // Neither side, or both, in the inner.
    for (a, b) in [("a", "b"), (":/a", ":/b")] {
        let out = local(&hull, &["cp", a, b], b"");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(text(&out.stderr).contains("in the inner"), "{out:?}");
    }
}

#[test]
fn cp_over_the_api_needs_an_exec_token() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let url = format!("http://{}", block_on(hull.api_addr()));
    let (read, exec) = (hull.api_token("read"), hull.api_token("exec"));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("note.txt");
    std::fs::write(&src, b"over the network\n").unwrap();

    let out = remote(
        &url,
        &read,
        &["cp", src.to_str().unwrap(), ":/tmp/note.txt"],
        b"",
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("scope exec"), "{out:?}");
    let out = remote(&url, &read, &["cp", ":/etc/os-release", "-"], b"");
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("scope exec"), "{out:?}");
    assert_eq!(
        inner_out(&hull, "test -e /tmp/note.txt && echo made || echo absent"),
        "absent"
    );

    let out = remote(
        &url,
        &exec,
        &["cp", src.to_str().unwrap(), ":/tmp/note.txt"],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    let back = dir.path().join("back.txt");
    let out = remote(
        &url,
        &exec,
        &["cp", ":/tmp/note.txt", back.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&back).unwrap(), b"over the network\n");
}

#[test]
fn a_tree_goes_in_and_comes_back_with_r() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::create_dir(tree.join("empty")).unwrap();
    std::fs::write(tree.join("top.txt"), b"top\n").unwrap();
    std::fs::write(tree.join("sub/deeper/data.bin"), pattern(200_000)).unwrap();
    std::fs::write(tree.join("sub/run.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        tree.join("sub/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    nix::unistd::mkfifo(
        &tree.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();

    // Without -r a directory is refused and nothing is made.
    inner_out(&hull, "mkdir -p /srv");
    let out = local(&hull, &["cp", tree.to_str().unwrap(), ":/srv"], b"");
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("-r"), "{out:?}");
    assert_eq!(
        inner_out(&hull, "test -e /srv/tree && echo made || echo absent"),
        "absent"
    );

    let v = copied(&hull, &["cp", "-r", tree.to_str().unwrap(), ":/srv"]);
    assert_eq!(
        (v["files"].as_u64(), v["bytes"].as_u64()),
        (Some(3), Some(200_014)),
        "{v}"
    );
    assert_eq!(v["destination"], ":/srv/tree", "{v}");
    assert_eq!(v["skipped"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(
        inner_out(
            &hull,
            "cd /srv/tree && find . | sort | tr '\\n' ' ' && stat -c %a sub/run.sh"
        ),
        ". ./empty ./sub ./sub/deeper ./sub/deeper/data.bin ./sub/run.sh ./top.txt 755"
    );

    // Back out into a new directory of that name.
    let back = dir.path().join("back");
    let out = local(
        &hull,
        &["cp", "-r", ":/srv/tree", back.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("3 files"), "{out:?}");
    assert!(std::fs::read(back.join("sub/deeper/data.bin")).unwrap() == pattern(200_000));
    assert_eq!(std::fs::read(back.join("top.txt")).unwrap(), b"top\n");
    assert!(back.join("empty").is_dir());
    assert_eq!(
        std::fs::metadata(back.join("sub/run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert!(!back.join("fifo").exists(), "a FIFO was copied");
}

/// `hull cp -r` copies a symlink as a symlink, its target text as it is,
/// both ways: never the file or directory it points to, and never
/// followed by hulld (root) or by hull on this machine.
#[test]
fn symlinks_are_copied_as_symlinks_both_ways() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/file.txt"), b"file\n").unwrap();
    for (name, target) in [
        ("abs", "/etc/passwd"),
        ("rel", "sub/file.txt"),
        ("dirlink", "sub"),
        ("dangling", "does/not/exist"),
        ("sub/up", "../sub/file.txt"),
    ] {
        std::os::unix::fs::symlink(target, tree.join(name)).unwrap();
    }
    inner_out(&hull, "mkdir -p /srv");
    // Twice: the second copy replaces the links the first made.
    for _ in 0..2 {
        let v = copied(&hull, &["cp", "-r", tree.to_str().unwrap(), ":/srv"]);
        assert_eq!(
            (v["files"].as_u64(), v["symlinks"].as_u64()),
            (Some(1), Some(5)),
            "{v}"
        );
        assert_eq!(v["skipped"].as_array().map(Vec::len), Some(0), "{v}");
    }
    assert_eq!(
        inner_out(
            &hull,
            "cd /srv/tree && for l in abs rel dirlink dangling sub/up; do \
             test -L $l && printf '%s=%s %s ' $l $(readlink $l) $(stat -c %u:%g $l); done; \
             find . -type f | sort | tr '\\n' ' '"
        ),
        "abs=/etc/passwd 0:0 rel=sub/file.txt 0:0 dirlink=sub 0:0 \
         dangling=does/not/exist 0:0 sub/up=../sub/file.txt 0:0 ./sub/file.txt"
    );

    // Links the inner made come back as links, pointing where they said.
    inner_out(
        &hull,
        "ln -s /etc/shadow /srv/tree/secret && ln -s / /srv/tree/sub/root",
    );
    let back = dir.path().join("back");
    let v = copied(&hull, &["cp", "-r", ":/srv/tree", back.to_str().unwrap()]);
    assert_eq!(
        (v["files"].as_u64(), v["symlinks"].as_u64()),
        (Some(1), Some(7)),
        "{v}"
    );
    for (name, target) in [
        ("abs", "/etc/passwd"),
        ("rel", "sub/file.txt"),
        ("dirlink", "sub"),
        ("dangling", "does/not/exist"),
        ("sub/up", "../sub/file.txt"),
        ("secret", "/etc/shadow"),
        ("sub/root", "/"),
    ] {
        let meta = std::fs::symlink_metadata(back.join(name)).unwrap();
        assert!(meta.file_type().is_symlink(), "{name} is not a symlink");
        assert_eq!(
            std::fs::read_link(back.join(name)).unwrap(),
            std::path::Path::new(target),
            "{name}"
        );
    }
    assert_eq!(std::fs::read(back.join("sub/file.txt")).unwrap(), b"file\n");
}
