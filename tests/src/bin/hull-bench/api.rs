//! Exec over the HTTP API against the unix socket, in the same run: an
//! exec `true` round trip on a new WebSocket each time, on a kept control
//! connection, and on a new unix-socket connection (the anchor); and the
//! time from a new WebSocket's first byte to the first output of `echo hi`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use hull_tests::ws::{collect, connect, Ws};
use hull_tests::{block_on, spec, TestHull};
use tokio_tungstenite::tungstenite::Message;

use crate::report::{ms, p50_of, print_rows, Row};

const UNIX: &str = "anchor: exec `true`, unix socket, new connection";
const API_NEW: &str = "exec `true`, API WebSocket, new connection";
const API_KEPT: &str = "exec `true`, API control connection, kept";
const FIRST_OUTPUT: &str = "API request -> first output of `echo hi`";

/// Rounds are interleaved in turns so that a slow patch of the machine
/// falls on every row alike.
const TURNS: usize = 5;

pub fn run(rounds: usize) -> Result<()> {
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let token = hull.api_token("exec");
    let name = sprite_name(&hull, addr, &token)?;
    let exec_true = format!("/v1/sprites/{name}/exec?cmd=true&stdin=false");
    let echo_hi = format!("/v1/sprites/{name}/exec?cmd=echo&cmd=hi&stdin=false");
    let (mut unix, mut api_new, mut api_kept, mut first) = (vec![], vec![], vec![], vec![]);
    block_on(async {
        let mut control = connect(addr, &format!("/v1/sprites/{name}/control"), &token).await?;
        for _ in 0..10 {
            api_exec(addr, &exec_true, &token).await?;
            control_exec(&mut control).await?;
        }
        for _ in 0..TURNS {
            for _ in 0..rounds.div_ceil(TURNS) {
                let t = Instant::now();
                let mut c = hull_outer::client::Client::connect(&hull.socket).await?;
                c.exec_collect(spec(&["true"]), b"").await?;
                unix.push(ms(t.elapsed()));

                let t = Instant::now();
                api_exec(addr, &exec_true, &token).await?;
                api_new.push(ms(t.elapsed()));

                let t = Instant::now();
                control_exec(&mut control).await?;
                api_kept.push(ms(t.elapsed()));

                first.push(first_output(addr, &echo_hi, &token).await?);
            }
        }
        Ok::<(), anyhow::Error>(())
    })?;
    let rows = vec![
        Row::new(UNIX, unix, "ms"),
        Row::new(API_NEW, api_new, "ms").target("<= 3 ms"),
        Row::new(API_KEPT, api_kept, "ms"),
        Row::new(FIRST_OUTPUT, first, "ms").target("<= 10 ms (Daytona 186, E2B 491)"),
    ];
    print_rows(&rows);
    let anchor = p50_of(&rows, UNIX);
    println!();
    for row in [API_NEW, API_KEPT] {
        println!(
            "{row}: {:.2}x the unix socket (p50)",
            p50_of(&rows, row) / anchor
        );
    }
    Ok(())
}

fn sprite_name(hull: &TestHull, addr: std::net::SocketAddr, token: &str) -> Result<String> {
    let r = hull_tests::http::request(addr, "GET", "/v1/sprites", Some(token), None);
    r.json()["sprites"][0]["name"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no sprite listed; hulld log:\n{}", hull.log()))
}

/// One exec on a new WebSocket, to its exit code and the client's close.
async fn api_exec(addr: std::net::SocketAddr, path: &str, token: &str) -> Result<()> {
    let mut ws = connect(addr, path, token).await?;
    match collect(&mut ws).await {
        Some((_, 0)) => {}
        other => bail!("exec `true` over the API ended with {other:?}"),
    }
    // As the SDK does: a close, without waiting for the server's.
    ws.send(Message::Close(None)).await?;
    Ok(())
}

/// Milliseconds from the connect to the first stdout frame.
async fn first_output(addr: std::net::SocketAddr, path: &str, token: &str) -> Result<f64> {
    let t = Instant::now();
    let mut ws = connect(addr, path, token).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(data))) if data.first() == Some(&1) => break,
            Some(Ok(_)) => {}
            other => bail!("no output from `echo hi` over the API: {other:?}"),
        }
    }
    let elapsed = ms(t.elapsed());
    collect(&mut ws).await;
    ws.send(Message::Close(None)).await?;
    Ok(elapsed)
}

/// `true` as an operation of a kept control connection, to `op.complete`.
async fn control_exec(control: &mut Ws) -> Result<()> {
    let start =
        r#"control:{"type":"op.start","op":"exec","args":{"cmd":["true"],"stdin":"false"}}"#;
    control.send(Message::text(start)).await?;
    while let Some(frame) = control.next().await {
        if let Message::Text(text) = frame? {
            if let Some(msg) = text.as_str().strip_prefix("control:") {
                let msg: serde_json::Value = serde_json::from_str(msg)?;
                if msg["type"] == "op.complete" && msg["args"]["exitCode"] == 0 {
                    return Ok(());
                }
                bail!("exec `true` on the control connection: {msg}");
            }
        }
    }
    bail!("the control connection closed during an exec")
}
