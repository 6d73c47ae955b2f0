//! `hull` runs where hulld never does (`hull vm` on a laptop, `hull --url`
//! from anywhere): nothing of the daemon may enter its build. This reads
//! the resolved dependency graph from `cargo metadata` and fails when a
//! daemon crate is among the CLI's normal dependencies, direct or not.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

/// hull's crates that make up hulld and the inner, never the CLI's.
const DAEMON_CRATES: &[&str] = &[
    "hull-outer",
    "hull-api",
    "hull-inner",
    "hull-cgroups",
    "hull-checkpoint",
    "hull-services",
    "hull-logs",
    "hull-network",
    "hull-init",
];

/// The packages `root` depends on at run time (normal dependencies,
/// followed through), by name.
fn normal_dependencies(metadata: &serde_json::Value, root: &str) -> BTreeSet<String> {
    let packages: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().expect("package id"),
                p["name"].as_str().expect("package name"),
            )
        })
        .collect();
    let nodes: HashMap<&str, &serde_json::Value> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| (n["id"].as_str().expect("node id"), n))
        .collect();
    let root_id = packages
        .iter()
        .find(|(_, name)| **name == root)
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("{root} is not in the workspace"));
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut todo = vec![root_id];
    while let Some(id) = todo.pop() {
        for dep in nodes[id]["deps"].as_array().expect("deps") {
            // A dependency kind of null is a normal one (not dev, not build).
            let normal = dep["dep_kinds"]
                .as_array()
                .expect("dep_kinds")
                .iter()
                .any(|k| k["kind"].is_null());
            let dep_id = dep["pkg"].as_str().expect("dependency id");
            if normal && seen.insert(dep_id) {
                names.insert(packages[dep_id].to_string());
                todo.push(dep_id);
            }
        }
    }
    names
}

fn metadata() -> serde_json::Value {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--offline",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON")
}

#[test]
fn the_cli_depends_on_no_daemon_crate() {
    let deps = normal_dependencies(&metadata(), "hull-cli");
    // The walk itself works: the CLI's own crates are found.
    for needed in ["hull-client", "hull-proto", "hull-image"] {
        assert!(deps.contains(needed), "{needed} not found in {deps:?}");
    }
    let daemon: Vec<&&str> = DAEMON_CRATES
        .iter()
        .filter(|c| deps.contains(**c))
        .collect();
    assert!(
        daemon.is_empty(),
        "hull-cli depends on daemon crates {daemon:?}: move what it needs into hull-proto or hull-client"
    );
}
