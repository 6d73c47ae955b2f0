//! The inner's user namespace: its root is an unprivileged id of the VM,
//! its files are root's inside and keep their on-disk owners, and what
//! users do as root inside still works.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use hull_tests::{
    block_on, current_upper, inner_pids_running, install_probe, probe, require_root, wait_until,
    Limits, RootKey, TestHull,
};

/// The default mapping: the inner's id n is the VM's 100000 + n.
const BASE: u32 = 100_000;

/// The real, effective, saved and filesystem ids of `pid`, from the root
/// namespace's /proc.
fn status_ids(pid: i32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

/// The pid, seen from the VM, of the single inner process running `argv`.
fn inner_process(hull: &TestHull, argv: &[&str]) -> i32 {
    let mut pid = None;
    wait_until(Duration::from_secs(5), "the inner process", || {
        pid = inner_pids_running(hull, argv).first().copied();
        pid.is_some()
    });
    pid.unwrap()
}

/// Starts `argv` in the inner, detached from any connection; its pid as
/// the VM sees it.
/// `shown`: its command line once it runs, when not `argv` (a program
/// that execs another).
fn start_detached(hull: &TestHull, argv: &[&str], shown: Option<&[&str]>) -> i32 {
    let mut request = hull_proto::ExecRequest::from(hull_tests::spec(argv));
    request.detach = true;
    block_on(async { hull.client().await.exec_detach(request).await.unwrap() });
    inner_process(hull, shown.unwrap_or(argv))
}

fn hull_without_user_namespace() -> TestHull {
    TestHull::start_with(Limits {
        tables: "[inner]\nuser_namespace = false\n".to_string(),
        ..Limits::default()
    })
}

/// The inner's root was the VM's root (uid 0 in the VM's /proc): one
/// escape from the mount namespace and it owned the machine. It is now
/// 100000 there and still 0 inside, and `status --json` says so.
#[test]
fn the_inner_root_is_an_unprivileged_id_in_the_vm() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let pid = start_detached(&hull, &["sleep", "3600"], None);
    assert_eq!(status_ids(pid, "Uid:"), vec![BASE; 4]);
    assert_eq!(status_ids(pid, "Gid:"), vec![BASE; 4]);
    let init = hull.wait_running(Duration::from_secs(5)).inner_pid.unwrap();
    assert_eq!(status_ids(init, "Uid:"), vec![BASE; 4], "the init");
    let inside = block_on(hull.sh("id -u; id -g; cat /proc/self/uid_map"));
    let fields: Vec<&str> = inside.split_whitespace().collect();
    assert_eq!(fields, ["0", "0", "0", &BASE.to_string(), "65536"]);
    let status = hull.hull(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        json["user_namespace"],
        serde_json::json!({ "base": BASE, "count": 65536 })
    );
    let human = String::from_utf8(hull.hull(&["status"]).stdout).unwrap();
    assert!(
        human.contains("user ns    inner ids 0-65535 are the VM's 100000-165535"),
        "{human}"
    );
}

/// `[inner] user_namespace = false` keeps the inner's root the VM's root.
#[test]
fn the_user_namespace_can_be_turned_off() {
    if !require_root() {
        return;
    }
    let hull = hull_without_user_namespace();
    let init = hull.wait_running(Duration::from_secs(5)).inner_pid.unwrap();
    assert_eq!(status_ids(init, "Uid:"), vec![0; 4]);
    let status = hull.hull(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["user_namespace"], serde_json::Value::Null);
}

/// Root inside owns the image's and the layer's files (idmapped mounts),
/// writes /etc, installs and chowns; a file chowned to 1000:1000 is
/// 1000:1000 on disk (the VM sees 101000 through the inner's mount) and
/// keeps its owner across a checkpoint, a restore and a bounce.
#[test]
fn root_inside_owns_its_files_and_owners_survive_restore_and_bounce() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let made = block_on(hull.sh(
        "stat -c %u:%g / /bin/sh /etc && echo hi >/etc/hull-userns && \
         mkdir -p /usr/local/bin && cp /bin/busybox /usr/local/bin/mine && chown 1000:1000 /usr/local/bin/mine && chmod 750 /usr/local/bin/mine && \
         mkdir -p /home/u && echo x >/home/u/f && chown 1000:1000 /home/u/f && \
         stat -c %u:%g /etc/hull-userns /usr/local/bin/mine /home/u/f",
    ));
    assert_eq!(
        made.split_whitespace().collect::<Vec<_>>(),
        ["0:0", "0:0", "0:0", "0:0", "1000:1000", "1000:1000"]
    );
    // The layer changes with a restore: found again each time.
    let on_disk = |rel: &str| {
        let m = std::fs::metadata(current_upper(&hull).join(rel)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(on_disk("home/u/f"), (1000, 1000));
    assert_eq!(on_disk("etc/hull-userns"), (0, 0));
    let init = hull.wait_running(Duration::from_secs(5)).inner_pid.unwrap();
    let through_inner = std::fs::metadata(format!("/proc/{init}/root/home/u/f")).unwrap();
    assert_eq!(
        (through_inner.uid(), through_inner.gid()),
        (BASE + 1000, BASE + 1000),
        "the VM's view of the file through the inner's mount"
    );

    let owners =
        || block_on(hull.sh("stat -c %u:%g /home/u/f /usr/local/bin/mine /etc/hull-userns"));
    let expected = "1000:1000\n1000:1000\n0:0\n";
    block_on(async {
        let mut c = hull.client().await;
        let made = c.checkpoint_create(None).await.unwrap();
        hull.sh("chown 0:0 /home/u/f && rm /etc/hull-userns /usr/local/bin/mine")
            .await;
        c.checkpoint_restore(&made.checkpoint.id).await.unwrap();
    });
    assert_eq!(owners(), expected, "after a restore");
    block_on(async { hull.client().await.bounce(1000).await.unwrap() });
    assert_eq!(owners(), expected, "after a bounce");
    assert_eq!(on_disk("home/u/f"), (1000, 1000));
}

/// A layer written with the namespace off (the inner's root is the VM's
/// uid 0 on disk) reads as root's with it on: the disk ids do not depend
/// on the setting, so old checkpoints restore either way.
#[test]
fn a_layer_written_without_the_namespace_is_root_s_with_it() {
    if !require_root() {
        return;
    }
    let mut hull = hull_without_user_namespace();
    block_on(hull.sh("echo old >/etc/before && chown 1000:1000 /etc/before"));
    hull.down();
    let config = std::fs::read_to_string(&hull.config).unwrap();
    std::fs::write(
        &hull.config,
        config.replace("user_namespace = false", "user_namespace = true"),
    )
    .unwrap();
    hull.spawn_hulld();
    let init = hull
        .wait_running(Duration::from_secs(10))
        .inner_pid
        .unwrap();
    assert_eq!(status_ids(init, "Uid:"), vec![BASE; 4]);
    let out = block_on(
        hull.sh("stat -c %u:%g /etc/before /etc && echo new >>/etc/before && cat /etc/before"),
    );
    assert_eq!(out, "1000:1000\n0:0\nold\nnew\n");
}

/// Root inside binds port 80 and pings (an ICMP datagram socket, as
/// iputils' ping opens without CAP_NET_RAW), though its capabilities are
/// its own user namespace's, which does not own the inner's network
/// namespace.
#[test]
fn the_inner_root_binds_port_80_and_pings() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let pid = start_detached(&hull, &["nc", "-l", "-p", "80"], None);
    assert_eq!(status_ids(pid, "Uid:"), vec![BASE; 4], "the listener");
    let out = block_on(hull.sh(
        "for i in 1 2 3 4 5 6 7 8 9 10; do netstat -ltn | grep -q ':80 ' && break; sleep 0.2; done; \
         netstat -ltn | grep -c ':80 '",
    ));
    assert_eq!(out, "1\n");
    install_probe(&hull);
    assert_eq!(probe(&hull, &["ping"])["ping"], "ok");
}

/// With the filter off, the inner's root reaches the kernel keyrings, but
/// they are its namespace's own: a key root added in the VM is neither
/// readable nor writable from inside.
#[test]
fn root_s_keys_are_out_of_reach_even_without_the_filter() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        tables: "[inner]\nseccomp = false\n".to_string(),
        ..Limits::default()
    });
    let key = RootKey::add();
    install_probe(&hull);
    let read = format!("keyctl-read:{}", key.0);
    let update = format!("keyctl-update:{}", key.0);
    let answers = probe(&hull, &["add_key", &read, &update]);
    assert_eq!(answers["add_key"], "ok", "its own keyring: {answers:?}");
    assert_ne!(answers[&read], "ok", "{answers:?}");
    assert_ne!(answers[&update], "ok", "{answers:?}");
    assert_eq!(key.payload(), b"root's secret");
}

/// A rootless nested container: `unshare -r` (and a mount in a mount
/// namespace of its own) works by default with the namespace on, and the
/// nested root is still the VM's 100000, not more. `[inner]
/// nested_user_namespaces = false` still refuses it.
#[test]
fn a_nested_user_namespace_works_by_default() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let out = block_on(
        hull.sh("unshare -r id -u; unshare -rm sh -c 'mount -t tmpfs none /tmp && echo mounted'"),
    );
    assert_eq!(out, "0\nmounted\n");
    let pid = start_detached(
        &hull,
        &["unshare", "-r", "sleep", "3601"],
        Some(&["sleep", "3601"]),
    );
    assert_eq!(status_ids(pid, "Uid:"), vec![BASE; 4]);
    drop(hull);
    // Still refused where asked for.
    let closed = TestHull::start_with(Limits {
        tables: "[inner]\nnested_user_namespaces = false\n".to_string(),
        ..Limits::default()
    });
    install_probe(&closed);
    assert_eq!(probe(&closed, &["unshare-user"])["unshare-user"], "errno 1");
}

/// A console is root's, sudo-less, on a terminal of the inner's devpts in
/// its tty group (5 inside, the VM's 100005), as login would leave it.
#[test]
fn a_console_is_root_s_on_a_tty_of_the_tty_group() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let tty = |argv: &[&str]| {
        let mut spec = hull_tests::spec(argv);
        spec.tty = Some(hull_proto::WinSize { rows: 24, cols: 80 });
        spec
    };
    let out = block_on(async {
        let mut c = hull.client().await;
        c.exec_collect(tty(&["sh", "-c", "id -u; stat -c %u:%g $(tty)"]), b"")
            .await
            .unwrap()
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).replace('\r', ""),
        "0\n0:5\n"
    );
    block_on(async {
        let mut c = hull.client().await;
        c.exec_start(tty(&["sleep", "3602"])).await.unwrap();
        let pid = inner_process(&hull, &["sleep", "3602"]);
        let terminal = std::fs::metadata(format!("/proc/{pid}/fd/0")).unwrap();
        assert_eq!((terminal.uid(), terminal.gid()), (BASE, BASE + 5));
    });
}

/// A .deb made here with dpkg-deb: one file, and a postinst that adds a
/// system user and gives it the file, as packages of daemons do.
fn local_package(dir: &std::path::Path) -> Vec<u8> {
    let root = dir.join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/hull-userns-test")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: hull-userns-test\nVersion: 1.0\nArchitecture: all\n\
         Maintainer: hull <hull@localhost>\nDescription: hull's user namespace test\n",
    )
    .unwrap();
    let postinst = root.join("DEBIAN/postinst");
    std::fs::write(
        &postinst,
        "#!/bin/sh\nset -e\nuseradd --system --uid 990 hulltest\n\
         chown hulltest:hulltest /usr/share/hull-userns-test/hello\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &postinst,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("usr/share/hull-userns-test/hello"), "hello\n").unwrap();
    let deb = dir.join("hull-userns-test.deb");
    let built = std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&deb)
        .output()
        .expect("dpkg-deb (Debian's dpkg)");
    assert!(built.status.success(), "dpkg-deb: {built:?}");
    std::fs::read(deb).unwrap()
}

/// `apt-get install` of a local package as root inside, on the Debian
/// image, without the network: dpkg writes /etc, the postinst adds a user
/// and chowns to it. On disk the file is the user's own id, 990; the VM
/// sees 100990 through the inner's mount.
#[test]
fn apt_get_installs_a_package_as_root_inside() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        image: hull_image::ImageKind::Debian,
        memory_max: "1G",
        ..Limits::default()
    });
    let deb = local_package(hull.dir.path());
    let out = block_on(hull.exec_with_stdin(
        &[
            "sh",
            "-c",
            "cat >/tmp/hull-userns-test.deb && \
             apt-get install -y /tmp/hull-userns-test.deb >/dev/null 2>/tmp/apt.err \
             || { cat /tmp/apt.err; exit 1; }; \
             dpkg-query -W -f '${Status}\\n' hull-userns-test; \
             stat -c %U:%G:%u /usr/share/hull-userns-test/hello; id -u hulltest",
        ],
        &deb,
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "install ok installed\nhulltest:hulltest:990\n990\n",
        "stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let on_disk =
        std::fs::metadata(current_upper(&hull).join("usr/share/hull-userns-test/hello")).unwrap();
    assert_eq!((on_disk.uid(), on_disk.gid()), (990, 990));
    let init = hull.wait_running(Duration::from_secs(5)).inner_pid.unwrap();
    let seen = std::fs::metadata(format!(
        "/proc/{init}/root/usr/share/hull-userns-test/hello"
    ))
    .unwrap();
    assert_eq!(seen.uid(), BASE + 990);
}
