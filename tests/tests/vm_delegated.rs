//! The hull VM booted as a stock systemd machine would start hulld: with
//! `hull.cgroup=/system.slice/hull.service`, hull-init starts hulld inside
//! that group, a delegated group that is not the root (dist/hull.service's
//! `Delegate=yes`). hulld must move itself to a leaf before the group can
//! hand controllers to its children, then start the inner below it with
//! its limits, and remove its groups again when the VM stops.

use std::time::Duration;

use hull_tests::vm::{free_port, http_get, init_lines, require_qemu, vm_image, Vm};

const GROUP: &str = "/system.slice/hull.service";

#[test]
fn hulld_runs_in_a_delegated_cgroup_that_is_not_the_root() {
    if !require_qemu() {
        return;
    }
    let image = vm_image();
    let vm = Vm::new(&image);
    let port = free_port();
    let group = format!("hull.cgroup={GROUP}");
    vm.run(port, &["--append", &group])
        .unwrap_or_else(|e| panic!("{e}"));

    // hull-init made the group and started hulld as a member of it.
    let console = vm.console();
    assert!(
        init_lines(&console)
            .any(|l| l.contains(&format!("created cgroup /sys/fs/cgroup{GROUP} for hulld"))),
        "{}",
        vm.console_tail()
    );
    let member = format!(") runs in cgroup {GROUP}");
    let hulld_pid: i32 = init_lines(&console)
        .find_map(|l| {
            let rest = l.split("hulld (pid ").nth(1)?;
            rest.ends_with(&member)
                .then(|| rest.split(')').next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no hull-init line with {member:?}:\n{}", vm.console_tail()));

    // hulld moved itself to the leaf, then into its own group below the
    // delegated one, and made the inner's there.
    let base = format!("/sys/fs/cgroup{GROUP}/hull");
    for field in [
        format!("daemon={base}/daemon"),
        format!("inner={base}/inner"),
        format!("leaf=/sys/fs/cgroup{GROUP}/supervisor"),
        format!("moved_to_leaf=[{hulld_pid}]"),
    ] {
        assert!(
            console
                .lines()
                .any(|l| l.contains("hull's cgroups are ready") && l.contains(&field)),
            "hulld's cgroup line has no {field:?}:\n{}",
            vm.console_tail()
        );
    }
    assert!(
        console.contains("hulld listening") && console.contains("cgroup_version=v2"),
        "{}",
        vm.console_tail()
    );
    // The cpu controller reached hull's groups: hulld's weight and the
    // inner's cap were written.
    assert!(
        !console.contains("no CPU weight or cap"),
        "{}",
        vm.console_tail()
    );

    // The inner starts: its group's memory.max and pids.max exist (a
    // limit is written to a file that must exist, never created), or the
    // start fails with the group's missing controller.
    assert!(
        vm.wait_console("inner ready", Duration::from_secs(60)),
        "the inner did not start:\n{}",
        vm.console_tail()
    );
    assert!(
        !vm.console().contains("inner failed to start"),
        "{}",
        vm.console_tail()
    );

    for line in vm
        .console()
        .lines()
        .filter(|l| l.contains("runs in cgroup") || l.contains("hull's cgroups are ready"))
    {
        eprintln!("{line}");
    }

    let (status, body) = http_get(port, "/v1/openapi.json", &[]);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let openapi: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        openapi["paths"]["/v1/openapi.json"].is_object(),
        "{openapi}"
    );

    // hulld stops the inner, leaves for the leaf and removes its groups.
    vm.stop_cleanly();
    let console = vm.console();
    assert!(
        init_lines(&console).any(|l| l.contains("hulld stopped")),
        "{}",
        vm.console_tail()
    );
    assert!(
        !console.contains("cannot remove hull's cgroups"),
        "{}",
        vm.console_tail()
    );
}
