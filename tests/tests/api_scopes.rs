//! What each token scope means: read is status and lists, and never what
//! a program holds or printed (service environments, logs, session
//! output, file contents); those need exec.

use hull_proto::{RestartPolicy, ServiceRequest, ServiceSpec};
use hull_tests::attacks::requests::sprite_name;
use hull_tests::http::request;
use hull_tests::{block_on, remote, require_root, TestHull};

#[test]
fn a_read_token_sees_status_and_lists_and_no_secrets() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let url = format!("http://{addr}");
    let (read, exec) = (hull.api_token("read"), hull.api_token("exec"));
    let spec = ServiceSpec {
        name: "web".into(),
        cmd: "echo \"password is $DB_PASSWORD\"; sleep 1000".into(),
        env: vec![("DB_PASSWORD".into(), "hunter2".into())],
        cwd: None,
        user: None,
        http_port: None,
        restart: RestartPolicy::Never,
        after: vec![],
    };
    block_on(async {
        let mut c = hull.client().await;
        c.services(ServiceRequest::Add(spec)).await.unwrap();
        let mut c = hull.client().await;
        c.exec_collect(
            hull_tests::spec(&["sh", "-c", "echo SECRET-FILE > /secret"]),
            b"",
        )
        .await
        .unwrap();
    });
    let base = format!("/v1/sprites/{}", sprite_name(addr, &read));

    // The service: its variable's name, never its value, for read.
    for path in [format!("{base}/services"), format!("{base}/services/web")] {
        let seen = request(addr, "GET", &path, Some(&read), None);
        assert_eq!(seen.status, 200, "{seen:?}");
        let text = seen.json().to_string();
        assert!(
            !text.contains("hunter2"),
            "{path} with a read token: {text}"
        );
        assert!(text.contains("DB_PASSWORD"), "{path}: {text}");
        let full = request(addr, "GET", &path, Some(&exec), None)
            .json()
            .to_string();
        assert!(
            full.contains("hunter2"),
            "{path} with an exec token: {full}"
        );
    }
    let out = remote(&url, &read, &["--json", "services", "show", "web"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !text.contains("hunter2"),
        "services show with a read token: {text}"
    );

    // Logs and file contents need exec; listing does not.
    let out = remote(&url, &read, &["logs", "web"], b"");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2"));
    assert!(err.contains("needs an API token with scope exec"), "{err}");
    let out = remote(&url, &read, &["logs", "exec"], b"");
    assert!(!out.status.success(), "{out:?}");
    let out = remote(&url, &exec, &["logs", "web"], b"");
    assert!(out.status.success(), "{out:?}");
    let r = request(
        addr,
        "GET",
        &format!("{base}/fs/read?path=/secret"),
        Some(&read),
        None,
    );
    assert_eq!(r.status, 403, "{r:?}");
    let r = request(
        addr,
        "GET",
        &format!("{base}/fs/read?path=/secret"),
        Some(&exec),
        None,
    );
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"SECRET-FILE\n"[..]),
        "{r:?}"
    );
    let r = request(
        addr,
        "GET",
        &format!("{base}/fs/list?path=/"),
        Some(&read),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");

    // Status and every list still answer a read token.
    for args in [
        &["--json", "status"][..],
        &["--json", "services", "list"],
        &["--json", "checkpoint", "list"],
        &["--json", "sessions", "list"],
        &["--json", "ports"],
    ] {
        let out = remote(&url, &read, args, b"");
        assert!(out.status.success(), "{args:?} with a read token: {out:?}");
    }
}

/// Every route of api/openapi.json, asked with no token and with each
/// scope, is answered as its `x-hull-scope` says: 401 without a token, 403
/// with too small a scope, and neither with enough (whatever else the
/// request, made with placeholder arguments, gets).
#[test]
fn every_route_answers_each_scope_as_the_table_says() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let tokens = [
        ("read", hull.api_token("read")),
        ("exec", hull.api_token("exec")),
        ("admin", hull.api_token("admin")),
    ];
    let rank = |scope: &str| ["read", "exec", "admin"].iter().position(|s| *s == scope);
    let name = sprite_name(addr, &tokens[0].1);
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../../api/openapi.json")).unwrap();
    let mut wrong = Vec::new();
    let mut asked = 0;
    for (template, ops) in doc["paths"].as_object().unwrap() {
        let path = template
            .replace("{name}", &name)
            .replace("{id}", "v999")
            .replace("{service}", "nope");
        for (method, op) in ops.as_object().unwrap() {
            let method = method.to_uppercase();
            let needed = op["x-hull-scope"].as_str();
            let body = (method != "GET").then_some("{}");
            let mut ask = |label: &str, token: Option<&str>, expect: &dyn Fn(u16) -> bool| {
                let r = request(addr, &method, &path, token, body);
                asked += 1;
                if !expect(r.status) {
                    wrong.push(format!("{method} {template} with {label}: {}", r.status));
                }
            };
            match needed {
                None => ask("no token", None, &|s| s != 401 && s != 403),
                Some(needed) => {
                    ask("no token", None, &|s| s == 401);
                    for (scope, token) in &tokens {
                        if rank(scope) < rank(needed) {
                            ask(scope, Some(token), &|s| s == 403);
                        } else {
                            ask(scope, Some(token), &|s| s != 401 && s != 403);
                        }
                    }
                }
            }
        }
    }
    assert!(asked > 100, "only {asked} requests");
    assert!(
        wrong.is_empty(),
        "answered against the table:\n{}",
        wrong.join("\n")
    );
}
