//! `/v1/sprites/{name}/exec` sessions as the Sprites API lists and kills
//! them: every exec is a session; one with a terminal runs on after its
//! client goes. Attaching (`/exec/{id}` as a WebSocket) is the exec
//! WebSocket's.

use std::time::Duration;

use hull_proto::SessionInfo;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::ndjson::{self, now_ms, rfc3339};
use crate::response::{json_response, Body};
use crate::Shared;

/// The largest body of a kill: a signal name and a timeout.
const MAX_KILL_BODY: usize = 4 * 1024;
/// The Sprites SDKs' default wait before SIGKILL, in seconds.
const DEFAULT_KILL_TIMEOUT_S: u64 = 10;
/// The longest wait before SIGKILL a kill may ask for.
const MAX_KILL_TIMEOUT_S: u64 = 300;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KillBody {
    #[serde(default)]
    signal: Option<String>,
    /// Seconds before SIGKILL.
    #[serde(default)]
    timeout: Option<u64>,
}

/// A session as the SDKs read it, with hull's `pid`, `clients`,
/// `scrollback_bytes` and `started_by` beside.
fn describe(s: &SessionInfo, now: i64) -> Value {
    #[allow(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = s.output_bytes as f64 / ((now - s.created_ms).max(1) as f64 / 1000.0);
    json!({
        "id": s.id.to_string(),
        // A word quoting cannot carry (a NUL) falls back to plain spaces.
        "command": shlex::try_join(s.argv.iter().map(String::as_str))
            .unwrap_or_else(|_| s.argv.join(" ")),
        "workdir": s.cwd.as_deref().unwrap_or("/"),
        "created": rfc3339(s.created_ms),
        "last_activity": rfc3339(s.last_activity_ms),
        "bytes_per_second": rate,
        "is_active": s.clients > 0,
        "tty": s.tty,
        "pid": s.pid,
        "clients": s.clients,
        "scrollback_bytes": s.scrollback_bytes,
        // Any exec token may attach to or kill any session: this says
        // whose it was.
        "started_by": s.started_by,
    })
}

async fn sessions(state: &Shared) -> Result<Vec<SessionInfo>, ApiError> {
    let mut client = state.connect().await?;
    client.sessions_list().await.map_err(ApiError::daemon)
}

pub async fn list(state: &Shared) -> Result<Response<Body>, ApiError> {
    let now = now_ms();
    let all: Vec<Value> = sessions(state)
        .await?
        .iter()
        .map(|s| describe(s, now))
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "sessions": all })))
}

/// Signals the session and streams NDJSON: `signal`, then `exited` (with
/// `forced` when it took a SIGKILL after the timeout) and `complete`, or
/// `error`.
pub async fn kill(
    state: &Shared,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: KillBody = crate::body::read_as(req, MAX_KILL_BODY).await?;
    let signal_name = body.signal.as_deref().unwrap_or("SIGTERM");
    let signal = crate::services::signal_number(signal_name)?;
    let timeout = body.timeout.unwrap_or(DEFAULT_KILL_TIMEOUT_S);
    if timeout > MAX_KILL_TIMEOUT_S {
        return Err(ApiError::bad_request(format!(
            "timeout {timeout} s is longer than the {MAX_KILL_TIMEOUT_S} s a kill waits"
        )));
    }
    let not_found = || ApiError::not_found(format!("no session {id:?} (GET .../exec lists them)"));
    let id: u64 = id.parse().map_err(|_| not_found())?;
    if !sessions(state).await?.iter().any(|s| s.id == id) {
        return Err(not_found());
    }
    let mut client = state.connect().await?;
    let (events, response) = ndjson::stream();
    events.send(json!({"type": "signal", "data": format!("sent {signal_name} to session {id}"), "timestamp": now_ms()}));
    tokio::spawn(async move {
        let timeout_ms = Duration::from_secs(timeout).as_millis();
        let timeout_ms = u64::try_from(timeout_ms).unwrap_or(u64::MAX);
        match client.session_kill(id, signal, timeout_ms).await {
            Ok(forced) => {
                events.send(json!({"type": "exited", "data": {"forced": forced}, "timestamp": now_ms()}));
                events.send(json!({"type": "complete", "timestamp": now_ms()}));
            }
            Err(e) => events.send(json!({"type": "error", "error": ApiError::daemon(e).message, "timestamp": now_ms()})),
        }
    });
    Ok(response)
}
