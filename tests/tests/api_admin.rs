//! Checkpoints, services, network policy, sessions and the OpenAPI document
//! over the HTTP API: scopes, bad input, and the Sprites SDK driving them.

use std::time::Duration;

use hull_tests::http::request;
use hull_tests::{
    block_on, inner_pids_running, require_root, sdk_admin as sdk, sdk_python, workspace_dir,
    TestHull,
};

use hull_tests::http::sprite_name;

/// The `type` of each event of an NDJSON response.
fn event_types(r: &hull_tests::http::Response) -> Vec<String> {
    String::from_utf8_lossy(&r.body)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn checkpoint_ids(hull: &TestHull) -> Vec<String> {
    block_on(async { hull.client().await.checkpoint_list().await.unwrap() })
        .checkpoints
        .into_iter()
        .map(|c| c.id)
        .collect()
}

fn service_names(hull: &TestHull) -> Vec<String> {
    block_on(async {
        hull.client()
            .await
            .services(hull_proto::ServiceRequest::List)
            .await
            .unwrap()
    })
    .into_iter()
    .map(|s| s.spec.name)
    .collect()
}

fn code(r: &hull_tests::http::Response) -> (u16, String) {
    (
        r.status,
        r.json()["error"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn admin_routes_refuse_lesser_tokens_and_bad_input_and_do_nothing() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let read = hull.api_token("read");
    let exec = hull.api_token("exec");
    let admin = hull.api_token("admin");
    let name = sprite_name(addr, &read);
    let base = format!("/v1/sprites/{name}");
    block_on(async { hull.client().await.checkpoint_create(None).await.unwrap() });
    let checkpoints = checkpoint_ids(&hull);

    // Neither read nor exec may checkpoint, restore, define services or
    // set the policy; nothing of it happens.
    let policy = r#"{"rules":[{"domain":"a.test","action":"deny"}]}"#;
    let service = r#"{"cmd":"sleep","args":["100"]}"#;
    for token in [&read, &exec] {
        for (method, path, body) in [
            ("POST", format!("{base}/checkpoint"), Some("{}")),
            ("POST", format!("{base}/checkpoints/v1/restore"), None),
            ("DELETE", format!("{base}/checkpoints/v1"), None),
            ("PUT", format!("{base}/services/sneaky"), Some(service)),
            ("POST", format!("{base}/policy/network"), Some(policy)),
        ] {
            let r = request(addr, method, &path, Some(token), body);
            assert_eq!(
                code(&r),
                (403, "insufficient_scope".into()),
                "{method} {path}: {r:?}"
            );
        }
    }
    assert_eq!(checkpoint_ids(&hull), checkpoints);
    assert!(service_names(&hull).is_empty());
    let r = request(
        addr,
        "GET",
        &format!("{base}/policy/network"),
        Some(&read),
        None,
    );
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).to_string()),
        (200, r#"{"rules":[]}"#.to_string()),
        "{r:?}"
    );

    // Bad input: a clear 400 or 413, and nothing made.
    // Method, path, body, the status and code wanted, a word the message says.
    type Case = (
        &'static str,
        String,
        String,
        (u16, &'static str),
        &'static str,
    );
    let cases: [Case; 8] = [
        (
            "POST",
            format!("{base}/checkpoint"),
            "{not json".into(),
            (400, "bad_request"),
            "not valid",
        ),
        (
            "POST",
            format!("{base}/checkpoint"),
            r#"{"comment":"x","bogus":1}"#.into(),
            (400, "bad_request"),
            "bogus",
        ),
        (
            "POST",
            format!("{base}/checkpoint"),
            format!(r#"{{"comment":"{}"}}"#, "x".repeat(70_000)),
            (413, "body_too_large"),
            "over",
        ),
        (
            "PUT",
            format!("{base}/services/web"),
            r#"{"cmd":"httpd","port":80}"#.into(),
            (400, "bad_request"),
            "port",
        ),
        (
            "PUT",
            format!("{base}/services/web"),
            r#"{"args":["x"]}"#.into(),
            (400, "bad_request"),
            "cmd",
        ),
        (
            "POST",
            format!("{base}/policy/network"),
            r#"{"rules":[{"domain":"a","action":"maybe"}]}"#.into(),
            (400, "bad_request"),
            "maybe",
        ),
        (
            "POST",
            format!("{base}/policy/network"),
            r#"{"rules":[],"extra":true}"#.into(),
            (400, "bad_request"),
            "extra",
        ),
        (
            "POST",
            format!("{base}/services/signal"),
            r#"{"name":"web","signal":"SIGNOPE"}"#.into(),
            (400, "bad_request"),
            "SIGNOPE",
        ),
    ];
    for (method, path, body, want, mentions) in cases {
        let r = request(addr, method, &path, Some(&admin), Some(&body));
        assert_eq!(
            code(&r),
            (want.0, want.1.to_string()),
            "{method} {path}: {r:?}"
        );
        let message = r.json()["message"].as_str().unwrap_or("").to_string();
        assert!(
            message.contains(mentions),
            "{method} {path}: {message:?} should say {mentions:?}"
        );
    }
    assert_eq!(checkpoint_ids(&hull), checkpoints);
    assert!(service_names(&hull).is_empty());

    // Unknown checkpoints and services are 404s, for reading and restoring.
    for (method, path) in [
        ("GET", format!("{base}/checkpoints/v99")),
        ("POST", format!("{base}/checkpoints/v99/restore")),
        ("GET", format!("{base}/services/nope")),
        ("POST", format!("{base}/services/nope/stop")),
    ] {
        let r = request(addr, method, &path, Some(&admin), None);
        assert_eq!(
            code(&r),
            (404, "not_found".into()),
            "{method} {path}: {r:?}"
        );
    }
    let r = request(
        addr,
        "GET",
        &format!("{base}/checkpoints/v99"),
        Some(&admin),
        None,
    );
    assert!(
        r.json()["message"].as_str().unwrap().contains("v1"),
        "{r:?}"
    );
    // A route that exists with other methods only.
    let r = request(
        addr,
        "PATCH",
        &format!("{base}/checkpoints"),
        Some(&admin),
        None,
    );
    assert_eq!(code(&r), (405, "method_not_allowed".into()), "{r:?}");
}

#[test]
fn the_openapi_document_is_served_without_a_token() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let r = request(addr, "GET", "/v1/openapi.json", None, None);
    assert_eq!(r.status, 200, "{r:?}");
    let checked_in = std::fs::read(workspace_dir().join("api/openapi.json")).unwrap();
    assert_eq!(r.body, checked_in);
}

#[test]
fn the_network_policy_is_returned_as_posted_and_survives_a_restart() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let admin = hull.api_token("admin");
    let name = sprite_name(addr, &admin);
    let path = format!("/v1/sprites/{name}/policy/network");
    // Odd spacing and key order: what comes back is these bytes.
    let posted = "{ \"rules\": [ {\"action\":\"allow\", \"domain\":\"example.com\"},\n {\"include\":\"defaults\"} ] }";
    let r = request(addr, "POST", &path, Some(&admin), Some(posted));
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("hull-policy-enforced"), None);
    hull.kill9_hulld();
    hull.spawn_hulld();
    hull.wait_running(Duration::from_secs(20));
    let addr = block_on(hull.api_addr());
    let r = request(addr, "GET", &path, Some(&admin), None);
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).to_string()),
        (200, posted.to_string()),
        "{r:?}"
    );
    assert_eq!(r.header("hull-policy-enforced"), None);
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[test]
fn the_sdk_checkpoints_breaks_files_restores_and_the_service_comes_back() {
    if !require_root() {
        return;
    }
    let Some(python) = sdk_python() else {
        return;
    };
    let hull = TestHull::start();
    let admin = hull.api_token("admin");
    block_on(async {
        hull.sh("mkdir -p /root/work && echo precious > /root/work/a && echo kept > /root/b")
            .await
    });

    let made = sdk(&python, &hull, &admin, &["checkpoint"]);
    let id = made["id"].as_str().unwrap().to_string();
    assert!(id.starts_with('v'), "{made}");
    assert_eq!(made["events"][0][0], "info", "{made}");

    block_on(async {
        hull.sh("rm -rf /root/work && echo broken > /root/b && touch /root/new")
            .await
    });
    assert!(!service_names(&hull).contains(&"web".to_string()));

    let restored = sdk(&python, &hull, &admin, &["restore", &id]);
    assert_eq!(restored["web"], "running", "{restored}");
    assert_eq!(restored["port"], 8090, "{restored}");
    let files = sdk(&python, &hull, &admin, &["files"]);
    assert_eq!(files["a"], "precious\n", "{files}");
    assert_eq!(files["b"], "kept\n", "{files}");
    assert_eq!(files["new"], false, "{files}");
    assert_eq!(files["root"], serde_json::json!(["b", "work"]), "{files}");
    // The service really serves: hulld sees its port accept connections.
    hull_tests::wait_until(Duration::from_secs(20), "web's port to accept", || {
        block_on(async {
            hull.client()
                .await
                .services(hull_proto::ServiceRequest::Show("web".into()))
                .await
                .is_ok_and(|s| s[0].ready)
        })
    });

    let policy = sdk(&python, &hull, &admin, &["policy"]);
    assert_eq!(policy, serde_json::json!({"before": 0, "after": 3}));
}

/// A hulld for the services tests: its API address, an admin token and
/// the services routes' base path.
fn services_hull() -> Option<(TestHull, std::net::SocketAddr, String, String)> {
    if !require_root() {
        return None;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let admin = hull.api_token("admin");
    let base = format!("/v1/sprites/{}/services", sprite_name(addr, &admin));
    Some((hull, addr, admin, base))
}

#[test]
fn services_stop_start_and_signal_over_the_api() {
    let Some((hull, addr, admin, base)) = services_hull() else {
        return;
    };
    // A service that says which signal reached it.
    let body = r#"{"cmd":"sh","args":["-c","trap 'echo got-hup' HUP; echo up; while :; do sleep 0.1; done"]}"#;
    let r = request(
        addr,
        "PUT",
        &format!("{base}/talker?duration=1s"),
        Some(&admin),
        Some(body),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let events = String::from_utf8_lossy(&r.body).to_string();
    assert!(events.contains(r#""type":"started""#), "{events}");
    assert!(events.contains(r#""data":"up\n""#), "{events}");
    assert!(
        events.trim_end().ends_with('}') && events.lines().last().unwrap().contains("complete"),
        "{events}"
    );

    let r = request(
        addr,
        "POST",
        &format!("{base}/signal"),
        Some(&admin),
        Some(r#"{"name":"talker","signal":"HUP"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    hull_tests::wait_until(Duration::from_secs(10), "the HUP in talker's log", || {
        String::from_utf8_lossy(&hull.hull(&["logs", "talker"]).stdout).contains("got-hup")
    });

    let r = request(
        addr,
        "POST",
        &format!("{base}/talker/stop"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(event_types(&r), ["stopping", "stopped", "complete"]);
    let r = request(addr, "GET", &format!("{base}/talker"), Some(&admin), None);
    assert_eq!(r.json()["state"]["status"], "stopped", "{r:?}");
    let r = request(
        addr,
        "POST",
        &format!("{base}/signal"),
        Some(&admin),
        Some(r#"{"name":"talker","signal":"SIGTERM"}"#),
    );
    assert_eq!(code(&r), (409, "not_running".into()), "{r:?}");

    let r = request(
        addr,
        "POST",
        &format!("{base}/talker/start"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    hull_tests::wait_until(Duration::from_secs(10), "talker to run again", || {
        request(addr, "GET", &format!("{base}/talker"), Some(&admin), None).json()["state"]
            ["status"]
            == "running"
    });
    let r = request(addr, "GET", &base, Some(&admin), None);
    let listed = r.json();
    assert_eq!(listed[0]["cmd"], "sh", "{listed}");
    assert_eq!(listed[0]["args"][0], "-c", "{listed}");
    let r = request(
        addr,
        "DELETE",
        &format!("{base}/talker"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert!(service_names(&hull).is_empty());
}

#[test]
fn sessions_are_listed_and_killed_over_the_api_and_through_the_sdk() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let (read, exec) = (hull.api_token("read"), hull.api_token("exec"));
    let base = format!("/v1/sprites/{}/exec", sprite_name(addr, &read));
    // A terminal session whose client went: it runs on.
    let start = |argv: &[&str]| {
        block_on(async {
            let mut spec = hull_tests::spec(argv);
            spec.tty = Some(hull_proto::WinSize { rows: 24, cols: 80 });
            hull.client().await.exec_begin(spec).await.unwrap().session
        })
    };
    let id = start(&["sleep", "1006"]);
    let r = request(addr, "GET", &base, Some(&read), None);
    assert_eq!(r.status, 200, "{r:?}");
    let listed = r.json()["sessions"].as_array().unwrap().clone();
    let s = listed
        .iter()
        .find(|s| s["id"].as_str() == Some(id.to_string().as_str()))
        .unwrap_or_else(|| panic!("session {id} not in {listed:?}"));
    assert_eq!(s["command"], "sleep 1006", "{s}");
    assert_eq!(s["tty"], true, "{s}");
    assert!(s["created"].as_str().unwrap().ends_with('Z'), "{s}");

    let kill = format!("{base}/{id}/kill");
    let r = request(addr, "POST", &kill, Some(&read), Some("{}"));
    assert_eq!(r.status, 403, "a read token cannot kill: {r:?}");
    let r = request(
        addr,
        "POST",
        &kill,
        Some(&exec),
        Some(r#"{"signal":"NOPE"}"#),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let r = request(
        addr,
        "POST",
        &format!("{base}/999999/kill"),
        Some(&exec),
        Some("{}"),
    );
    assert_eq!(r.status, 404, "{r:?}");
    let r = request(
        addr,
        "POST",
        &kill,
        Some(&exec),
        Some(r#"{"signal":"SIGTERM","timeout":5}"#),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(event_types(&r), ["signal", "exited", "complete"], "{r:?}");
    assert!(inner_pids_running(&hull, &["sleep", "1006"]).is_empty());

    let Some(python) = sdk_python() else {
        return;
    };
    let id = start(&["sleep", "1007"]);
    hull_tests::wait_until(Duration::from_secs(5), "the client to be gone", || {
        block_on(async { hull.client().await.sessions_list().await.unwrap() })
            .iter()
            .any(|s| s.id == id && s.clients == 0)
    });
    let got = sdk(&python, &hull, &exec, &["sessions", &id.to_string()]);
    assert_eq!(got["command"], "sleep 1007", "{got}");
    assert_eq!(
        got["events"].as_array().unwrap().last().unwrap(),
        "complete",
        "{got}"
    );
    assert!(
        !got["left"]
            .as_array()
            .unwrap()
            .contains(&id.to_string().into()),
        "{got}"
    );
}

/// `POST .../services/NAME/stop?timeout=D` is how long the service has
/// between SIGTERM and SIGKILL: a service that takes a second to leave
/// exits on its own with the default, and is killed with `timeout=0s`.
#[test]
fn a_service_stop_takes_the_time_it_is_given() {
    let Some((_hull, addr, admin, base)) = services_hull() else {
        return;
    };
    let body = r#"{"cmd":"sh","args":["-c","trap 'sleep 1; exit 7' TERM; echo up; while :; do sleep 0.1; done"]}"#;
    let stop = |query: &str| {
        let r = request(
            addr,
            "PUT",
            &format!("{base}/slow?duration=1s"),
            Some(&admin),
            Some(body),
        );
        assert_eq!(r.status, 200, "{r:?}");
        let r = request(
            addr,
            "POST",
            &format!("{base}/slow/stop{query}"),
            Some(&admin),
            None,
        );
        assert_eq!(r.status, 200, "{r:?}");
        let events: Vec<serde_json::Value> = String::from_utf8_lossy(&r.body)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let stopped = events.iter().find(|e| e["type"] == "stopped").cloned();
        stopped.unwrap_or_else(|| panic!("no stopped event: {events:?}"))["exit_code"].clone()
    };
    assert_eq!(
        stop(""),
        7,
        "the service's own exit, within the default 5 s"
    );
    assert_eq!(stop("?timeout=0s"), 137, "SIGKILL at once");
    assert_eq!(stop("?timeout=10"), 7, "seconds without a unit");
    let r = request(
        addr,
        "POST",
        &format!("{base}/slow/stop?timeout=soon"),
        Some(&admin),
        None,
    );
    assert_eq!(code(&r), (400, "bad_request".into()), "{r:?}");
}
