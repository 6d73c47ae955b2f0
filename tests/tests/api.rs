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

#[test]
fn the_api_serves_https_with_the_configured_certificate() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    if !require_root() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    let hull = TestHull::start_with(hull_tests::Limits {
        api_extra: format!("tls_cert = {cert:?}\ntls_key = {key:?}\n"),
        ..Default::default()
    });
    let status = block_on(async { hull.client().await.status().await.unwrap() });
    assert!(
        status.api.as_deref().unwrap().starts_with("https://"),
        "{status:?}"
    );
    let addr = block_on(hull.api_addr());

    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let answer = block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"GET /v1/sprites HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).to_string()
    });
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("\"no_tokens\""), "{answer}");

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = std::panic::catch_unwind(|| {
        hull_tests::http::request(addr, "GET", "/v1/sprites", None, None)
    });
    assert!(
        plain.is_err() || plain.as_ref().is_ok_and(|r| r.status != 401),
        "plain HTTP was served on the HTTPS port"
    );
}

/// A client that sends headers without end: hulld reads a bounded head,
/// answers 431 and closes, and goes on serving everyone else.
#[test]
fn an_endless_header_is_cut_off_and_hulld_serves_on() {
    use std::io::{Read, Write};
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let rss_before = hull_tests::rss_kib(hull.hulld_pid());
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"GET /v1/sprites HTTP/1.1\r\nHost: x\r\nX-Big: ")
        .unwrap();
    // Up to 1 GiB of one header; the server stops reading long before.
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = 0usize;
    while sent < 1 << 30 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 1 << 30, "hulld read a whole 1 GiB header");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    let r = request(addr, "GET", "/v1/sprites", None, None);
    assert_eq!(r.status, 401, "{r:?}");
    let rss_after = hull_tests::rss_kib(hull.hulld_pid());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "hulld grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// A hulld for the proxy tests: its API address, an exec token, the
/// sandbox's name and the inner's init pid.
fn proxy_hull() -> Option<(TestHull, std::net::SocketAddr, String, String, i32)> {
    if !require_root() {
        return None;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let exec = hull.api_token("exec");
    let sprites = request(addr, "GET", "/v1/sprites", Some(&exec), None).json();
    let name = sprites["sprites"][0]["name"].as_str().unwrap().to_string();
    let status = hull.wait_running(std::time::Duration::from_secs(10));
    Some((hull, addr, exec, name, status.inner_pid.unwrap()))
}

/// The port proxy the SDKs open (`/v1/sprites/{name}/proxy`) reaches a
/// listener on the inner's own loopback, carries bytes both ways in order,
/// and refuses what it cannot reach with an error message, not a hang.
#[test]
fn the_port_proxy_reaches_the_inners_loopback() {
    use futures::{SinkExt, StreamExt};
    use std::io::{Read, Write};
    use tokio_tungstenite::tungstenite::Message;

    let Some((hull, addr, exec, name, inner_pid)) = proxy_hull() else {
        return;
    };
    let read = hull.api_token("read");
    let path = format!("/v1/sprites/{name}/proxy");
    let listener = hull_tests::listen_in_inner(inner_pid, 9300..9301).remove(0);
    // Echoes each connection's bytes back, and says where they came from.
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            conn.write_all(&buf[..n]).unwrap();
            if got.len() >= 4 << 20 {
                break;
            }
        }
        (peer, got.len())
    });

    let refused = block_on(hull_tests::ws::connect(addr, &path, &read));
    assert!(
        matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 403),
        "a read token opened the proxy: {refused:?}"
    );

    let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let echoed = block_on(async {
        let mut ws = hull_tests::ws::connect(addr, &path, &exec).await.unwrap();
        ws.send(Message::text(r#"{"host":"localhost","port":9300}"#))
            .await
            .unwrap();
        let Some(Ok(Message::Text(answer))) = ws.next().await else {
            panic!("no answer to the proxy's first message");
        };
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["status"], "connected", "{answer}");
        assert_eq!(answer["target"], "127.0.0.1:9300", "{answer}");
        let (mut sink, mut stream) = ws.split();
        let writer = async {
            for chunk in sent.chunks(100_000) {
                sink.send(Message::binary(chunk.to_vec())).await.unwrap();
            }
            sink
        };
        let reader = async {
            let mut echoed = Vec::new();
            while echoed.len() < sent.len() {
                match stream.next().await {
                    Some(Ok(Message::Binary(data))) => echoed.extend_from_slice(&data),
                    other => panic!("after {} bytes: {other:?}", echoed.len()),
                }
            }
            // The server hung up: the proxy closes the WebSocket.
            let end = stream.next().await;
            assert!(
                matches!(end, Some(Ok(Message::Close(_))) | None),
                "after the target closed: {end:?}"
            );
            echoed
        };
        let (_sink, echoed) = tokio::join!(writer, reader);
        echoed
    });
    assert!(echoed == sent, "the echoed bytes differ from those sent");
    let (peer, received) = server.join().unwrap();
    assert_eq!(received, sent.len());
    assert!(peer.ip().is_loopback(), "the proxy came from {peer}");

    for (init, expect) in [
        (r#"{"host":"localhost","port":9301}"#, "cannot connect"),
        (r#"{"host":"example.com","port":80}"#, "not resolved"),
        (r#"{"port":"x"}"#, "first message"),
    ] {
        let answer = block_on(async {
            let mut ws = hull_tests::ws::connect(addr, &path, &exec).await.unwrap();
            ws.send(Message::text(init)).await.unwrap();
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    serde_json::from_str::<serde_json::Value>(&t).unwrap()
                }
                other => panic!("{init}: {other:?}"),
            }
        });
        assert_eq!(answer["status"], "error", "{init}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(expect),
            "{init}: {answer}"
        );
    }
}

/// The Go SDK runs its port proxy on a kept control connection: a bare
/// `{"type": "start", "operation": "proxy"}` message, the bytes, then
/// `{"type": "release"}`, after which the connection serves the next
/// operation. A proxy that cannot connect leaves the connection usable.
#[test]
fn the_port_proxy_runs_on_a_control_connection_and_hands_it_back() {
    use futures::{SinkExt, StreamExt};
    use std::io::{Read, Write};
    use tokio_tungstenite::tungstenite::Message;

    let Some((_hull, addr, exec, name, inner_pid)) = proxy_hull() else {
        return;
    };
    let listener = hull_tests::listen_in_inner(inner_pid, 9302..9303).remove(0);
    // Answers each line in upper case until the client hangs up.
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let mut got = 0;
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got += n;
                    conn.write_all(&buf[..n].to_ascii_uppercase()).unwrap();
                }
            }
        }
        got
    });
    let start = |port: u16| {
        Message::text(
            serde_json::json!({
                "type": "start",
                "operation": "proxy",
                "params": {"host": "localhost", "port": port, "keep_alive": true},
            })
            .to_string(),
        )
    };
    block_on(async {
        let path = format!("/v1/sprites/{name}/control");
        let mut ws = hull_tests::ws::connect(addr, &path, &exec).await.unwrap();
        let answer = async |ws: &mut hull_tests::ws::Ws| {
            let next = tokio::time::timeout(std::time::Duration::from_secs(20), ws.next()).await;
            match next {
                Ok(Some(Ok(Message::Text(t)))) => {
                    serde_json::from_str::<serde_json::Value>(&t).unwrap()
                }
                other => panic!("no answer to the proxy's start: {other:?}"),
            }
        };

        ws.send(start(9303)).await.unwrap();
        let refused = answer(&mut ws).await;
        assert_eq!(refused["status"], "error", "{refused}");

        ws.send(start(9302)).await.unwrap();
        let connected = answer(&mut ws).await;
        assert_eq!(connected["status"], "connected", "{connected}");
        ws.send(Message::binary(b"hello proxy\n".to_vec()))
            .await
            .unwrap();
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => assert_eq!(&data[..], b"HELLO PROXY\n"),
            other => panic!("no echo: {other:?}"),
        }
        ws.send(Message::text(r#"{"type":"release"}"#))
            .await
            .unwrap();

        // The same connection runs a command next.
        let op = r#"control:{"type":"op.start","op":"exec","args":{"cmd":["echo","after-the-proxy"],"stdin":"false"}}"#;
        ws.send(Message::text(op)).await.unwrap();
        let mut stdout = Vec::new();
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(data))) if data.first() == Some(&1) => {
                    stdout.extend_from_slice(&data[1..])
                }
                Some(Ok(Message::Text(t))) if t.contains("op.complete") => break,
                Some(Ok(Message::Text(t))) if t.contains("op.error") => panic!("{t}"),
                Some(Ok(_)) => {}
                other => panic!("the control connection ended: {other:?}"),
            }
        }
        assert_eq!(String::from_utf8_lossy(&stdout), "after-the-proxy\n");
    });
    // The release closed the proxied connection.
    assert_eq!(server.join().unwrap(), b"hello proxy\n".len());
}
