//! The HTTP API against a real hulld: tokens, scopes and the one sprite
//! it serves.

use hull_tests::http::request;
use hull_tests::{block_on, require_root, TestHull};

#[test]
fn the_api_refuses_everything_until_a_token_exists_then_checks_each_one() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());

    let r = request(addr, "GET", "/v1/sprites", None, None);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"], "no_tokens", "{r:?}");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("hull token create"));
    assert_eq!(r.header("sprite-version"), Some("v1"));

    let read = hull.api_token("read");
    let admin = hull.api_token("admin");
    let r = request(addr, "GET", "/v1/sprites", None, None);
    assert_eq!(r.json()["error"], "missing_token", "{r:?}");
    let r = request(addr, "GET", "/v1/sprites", Some("hull_0000_nope"), None);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, "invalid_token".into())
    );

    let r = request(addr, "GET", "/v1/sprites", Some(&read), None);
    assert_eq!(r.status, 200, "{r:?}");
    let list = r.json();
    assert_eq!(list["sprites"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["running"], 1, "{list}");
    let sprite = list["sprites"][0]["name"].as_str().unwrap().to_string();

    let r = request(
        addr,
        "GET",
        &format!("/v1/sprites/{sprite}"),
        Some(&read),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["status"], "running");
    let r = request(addr, "GET", "/v1/sprites/someone-else", Some(&read), None);
    assert_eq!(r.status, 404, "{r:?}");

    // Creating is admin's, idempotent for this sandbox, refused for another.
    let body = format!("{{\"name\": \"{sprite}\"}}");
    let r = request(addr, "POST", "/v1/sprites", Some(&read), Some(&body));
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (403, "insufficient_scope".into())
    );
    let r = request(addr, "POST", "/v1/sprites", Some(&admin), Some(&body));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["name"], sprite.as_str());
    let r = request(
        addr,
        "POST",
        "/v1/sprites",
        Some(&admin),
        Some("{\"name\": \"other\"}"),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (422, "single_sandbox".into())
    );
    let r = request(addr, "POST", "/v1/sprites", Some(&admin), Some("{not json"));
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, "bad_request".into())
    );

    // A revoked token is refused at once.
    let out = hull.hull(&["--json", "token", "list"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let id = read.split('_').nth(1).unwrap();
    assert!(hull.hull(&["token", "revoke", id]).status.success());
    let r = request(addr, "GET", "/v1/sprites", Some(&read), None);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, "invalid_token".into())
    );
}
