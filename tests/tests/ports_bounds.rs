//! Ports the inner cannot make hulld take on the outer address: hulld's
//! own (the HTTP API's, the HTTP ingress's), which it binds before any
//! inner starts and never forwards, and ports below 1024 unless
//! `network.expose` names them.

use std::net::SocketAddr;
use std::time::Duration;

use hull_tests::http::request;
use hull_tests::siege::Siege;
use hull_tests::{block_on, listen_in_inner, require_root, wait_until, Limits, TestHull};

/// The port below 1024 the inner listens on.
const LOW_PORT: u16 = 81;

/// A hulld whose API listens on its outer address, as in a VM image.
fn start(network_extra: &str) -> Option<(TestHull, SocketAddr, i32)> {
    if !require_root() {
        return None;
    }
    let hull = TestHull::start_with(Limits {
        api_listen: "OUTER:0",
        network_extra: network_extra.to_string(),
        ..Limits::default()
    });
    let api = block_on(hull.api_addr());
    assert_eq!(api.ip(), hull.outer, "the API listens on the outer address");
    let inner_pid = hull
        .wait_running(Duration::from_secs(10))
        .inner_pid
        .expect("the inner's pid");
    Some((hull, api, inner_pid))
}

/// `hull ports --json`'s entry of each of `ports`, once none is pending.
fn wait_reported(hull: &TestHull, ports: &[u16]) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    wait_until(
        Duration::from_secs(10),
        &format!("ports {ports:?} reported"),
        || {
            let out = hull.hull(&["ports", "--json"]);
            assert!(out.status.success(), "hull ports: {out:?}");
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            found = ports
                .iter()
                .filter_map(|port| {
                    report["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|p| p["port"] == *port && p["exposure"] != "pending")
                        .cloned()
                })
                .collect();
            found.len() == ports.len()
        },
    );
    found
}

fn api_answers(api: SocketAddr, hull: &TestHull) {
    let token = hull.api_token("read");
    let r = request(api, "GET", "/v1/sprites", Some(&token), None);
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn hullds_own_ports_and_low_ports_are_not_forwarded_and_say_why() {
    let Some((hull, api, inner_pid)) = start("") else {
        return;
    };
    let siege = Siege::begin(&hull);
    let _held: Vec<_> = [api.port(), hull.http_port, LOW_PORT]
        .into_iter()
        .flat_map(|p| listen_in_inner(inner_pid, p..p + 1))
        .collect();
    let entries = wait_reported(&hull, &[api.port(), hull.http_port, LOW_PORT]);
    siege.assert_held(&hull, "the inner listening on hulld's own ports");
    let want = [
        (api.port(), "HTTP API"),
        (hull.http_port, "HTTP ingress"),
        (LOW_PORT, "network.expose"),
    ];
    let wrong: Vec<String> = entries
        .iter()
        .zip(want)
        .filter(|(entry, (_, why))| {
            entry["exposure"] != "not-forwarded"
                || !entry["detail"].as_str().is_some_and(|d| d.contains(why))
        })
        .map(|(entry, (port, why))| format!("port {port}: want not-forwarded ({why}), got {entry}"))
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    // The API is hulld's, not a relay into the inner.
    api_answers(api, &hull);
    let table = String::from_utf8(hull.hull(&["ports"]).stdout).unwrap();
    assert!(
        table.contains("HTTP API") && table.contains("network.expose"),
        "{table}"
    );
}

#[test]
fn a_low_port_named_in_expose_is_forwarded() {
    let Some((hull, api, inner_pid)) = start(&format!("expose = \"{LOW_PORT},8000-9000\"\n"))
    else {
        return;
    };
    let _held = listen_in_inner(inner_pid, LOW_PORT..LOW_PORT + 1);
    let entries = wait_reported(&hull, &[LOW_PORT]);
    assert_eq!(entries[0]["exposure"], "forwarded", "{}", entries[0]);
    // Reached from outside, through the forward, into the inner's listener.
    let outer = SocketAddr::from((hull.outer, LOW_PORT));
    std::net::TcpStream::connect(outer).expect("connect to the forwarded port");
    api_answers(api, &hull);
}
