//! `/v1/sprites/{name}/services`: hull's services as the Sprites API shows
//! them. A Sprites service is a program and its arguments; a hull service
//! is one `/bin/sh -c` command line, so `cmd` and `args` are joined with
//! shell quoting, and a command line that quoting did not make is shown as
//! `/bin/sh -c LINE`, which is what runs. `needs` is hull's `after`, `dir`
//! its `cwd`. Put, start and stop answer a stream of NDJSON events.

use std::collections::BTreeMap;
use std::time::Duration;

use hull_client::Client;
use hull_proto::{
    ClientMsg, DaemonMsg, ExitStatus, LogMarker, RestartPolicy, ServiceRequest, ServiceSpec,
    ServiceStatus, Stream,
};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::ndjson::{self, now_ms, rfc3339, Events};
use crate::response::{empty_response, json_response, Body};
use crate::Shared;

/// The largest service definition or signal request.
const MAX_BODY: usize = 64 * 1024;

/// The longest a put or start may stream the service's output.
const MAX_DURATION: Duration = Duration::from_secs(60);

/// How often a stream looks again for a log that does not exist yet.
const LOG_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    needs: Vec<String>,
    #[serde(default)]
    http_port: Option<u16>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    dir: Option<String>,
    /// hull's own: always, on-failure (the default) or never.
    #[serde(default)]
    restart: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    name: String,
    signal: String,
}

/// `cmd` and `args` as the shell line hull runs.
fn command_line(cmd: &str, args: &[String]) -> Result<String, ApiError> {
    shlex::try_join(std::iter::once(cmd).chain(args.iter().map(String::as_str)))
        .map_err(|e| ApiError::bad_request(format!("cmd and args cannot be a command line: {e}")))
}

/// The program and arguments a command line runs: its words when shell
/// quoting of those words gives the line back, else the shell itself.
fn program(line: &str) -> (String, Vec<String>) {
    if let Some(words) = shlex::split(line) {
        let rejoined = shlex::try_join(words.iter().map(String::as_str));
        if let (Some((cmd, args)), Ok(true)) = (words.split_first(), rejoined.map(|r| r == line)) {
            return (cmd.clone(), args.to_vec());
        }
    }
    ("/bin/sh".into(), vec!["-c".into(), line.into()])
}

/// hull's states in the Sprites words (stopped, starting, running,
/// failed); `hull_state` keeps hull's own.
fn status_word(state: &str) -> &'static str {
    match state {
        "running" => "running",
        "waiting" | "starting" | "backoff" => "starting",
        "failed" => "failed",
        _ => "stopped",
    }
}

fn describe(s: &ServiceStatus) -> Value {
    let (cmd, args) = program(&s.spec.cmd);
    let env: BTreeMap<&str, &str> = s
        .spec
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let started_at = s
        .uptime_ms
        .map(|up| rfc3339(now_ms().saturating_sub(i64::try_from(up).unwrap_or(i64::MAX))));
    json!({
        "name": s.spec.name,
        "cmd": cmd,
        "args": args,
        "needs": s.spec.after,
        "http_port": s.spec.http_port,
        "env": env,
        "dir": s.spec.cwd,
        "restart": s.spec.restart.name(),
        "state": {
            "name": s.spec.name,
            "status": status_word(&s.state),
            "hull_state": s.state,
            "pid": s.pid,
            "started_at": started_at,
            "error": s.reason,
            "restart_count": s.restarts,
            "ready": s.ready,
        },
    })
}

async fn connect(state: &Shared) -> Result<Client, ApiError> {
    state.connect().await
}

/// `request` on a connection with the token's own scope: hulld refuses a
/// change a read token asks for, and redacts what that token may not see.
async fn request(state: &Shared, request: ServiceRequest) -> Result<Vec<ServiceStatus>, ApiError> {
    connect(state)
        .await?
        .services(request)
        .await
        .map_err(ApiError::daemon)
}

/// A `?key=5s` (or `500ms`) query parameter.
fn query_duration(req: &Request<Incoming>, key: &str) -> Result<Option<Duration>, ApiError> {
    let Some(query) = req.uri().query() else {
        return Ok(None);
    };
    let Some(value) = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(format!(
            "{key}={value}: expected seconds like 5s or 1.5s, or 500ms"
        ))
    };
    let (number, scale) = match value.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (value.strip_suffix('s').unwrap_or(value), 1.0),
    };
    let secs = number.parse::<f64>().map_err(|_| bad())? * scale;
    Duration::try_from_secs_f64(secs)
        .map(Some)
        .map_err(|_| bad())
}

pub async fn list(state: &Shared) -> Result<Response<Body>, ApiError> {
    let all = request(state, ServiceRequest::List).await?;
    let described: Vec<Value> = all.iter().map(describe).collect();
    Ok(json_response(StatusCode::OK, &Value::Array(described)))
}

pub async fn get(state: &Shared, name: &str) -> Result<Response<Body>, ApiError> {
    let shown = request(state, ServiceRequest::Show(name.to_string())).await?;
    let first = shown
        .first()
        .ok_or_else(|| ApiError::internal("hulld answered a service show with nothing"))?;
    Ok(json_response(StatusCode::OK, &describe(first)))
}

pub async fn delete(state: &Shared, name: &str) -> Result<Response<Body>, ApiError> {
    request(state, ServiceRequest::Remove(name.to_string()))
        .await
        .map_err(conflict_if_refused)?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

/// A service the registry refuses to remove or replace (others start after
/// it) is in conflict with them: 409, which the SDKs name so.
fn conflict_if_refused(e: ApiError) -> ApiError {
    match e.code {
        "service_refused" => ApiError::new(StatusCode::CONFLICT, "conflict", e.message),
        _ => e,
    }
}

/// Creates or replaces the service, then streams its output for
/// `?duration=` (none by default).
pub async fn put(
    state: &Shared,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let duration = query_duration(&req, "duration")?;
    let body: PutBody = crate::body::read_as(req, MAX_BODY).await?;
    let restart = match body.restart.as_deref() {
        None => RestartPolicy::default(),
        Some(r) => r
            .parse()
            .map_err(|e| ApiError::bad_request(format!("restart: {e}")))?,
    };
    let spec = ServiceSpec {
        name: name.to_string(),
        cmd: command_line(&body.cmd, &body.args)?,
        env: body.env.into_iter().collect(),
        cwd: body.dir,
        user: None,
        http_port: body.http_port,
        restart,
        after: body.needs,
    };
    let since_ms = now_ms();
    let mut client = connect(state).await?;
    let exists = client
        .services(ServiceRequest::List)
        .await
        .map_err(ApiError::daemon)?
        .iter()
        .any(|s| s.spec.name == name);
    if exists {
        client
            .services(ServiceRequest::Remove(name.to_string()))
            .await
            .map_err(|e| conflict_if_refused(ApiError::daemon(e)))?;
    }
    client
        .services(ServiceRequest::Add(spec))
        .await
        .map_err(|e| conflict_if_refused(ApiError::daemon(e)))?;
    Ok(follow(state, name, since_ms, duration))
}

pub async fn start(
    state: &Shared,
    name: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let duration = query_duration(req, "duration")?;
    let since_ms = now_ms();
    request(state, ServiceRequest::Start(name.to_string())).await?;
    Ok(follow(state, name, since_ms, duration))
}

pub async fn stop(
    state: &Shared,
    name: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let timeout = query_duration(req, "timeout")?;
    let mut client = connect(state).await?;
    // Known before the stream begins, so an unknown service is a 404.
    client
        .services(ServiceRequest::Show(name.to_string()))
        .await
        .map_err(ApiError::daemon)?;
    let (events, response) = ndjson::stream();
    events.send(json!({"type": "stopping", "timestamp": now_ms()}));
    let name = name.to_string();
    tokio::spawn(async move {
        let stop = match timeout {
            Some(t) => ServiceRequest::StopWithin {
                name,
                timeout_ms: u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
            },
            None => ServiceRequest::Stop(name),
        };
        match client.services(stop).await {
            Ok(stopped) => {
                let exit_code = stopped
                    .first()
                    .and_then(|s| s.last_exit)
                    .map(ExitStatus::shell_code);
                events.send(json!({"type": "stopped", "exit_code": exit_code, "timestamp": now_ms()}));
                events.send(json!({"type": "complete", "timestamp": now_ms()}));
            }
            Err(e) => events.send(json!({"type": "error", "data": ApiError::daemon(e).message, "timestamp": now_ms()})),
        }
    });
    Ok(response)
}

pub async fn signal(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: SignalBody = crate::body::read_as(req, MAX_BODY).await?;
    let signal = signal_number(&body.signal)?;
    request(
        state,
        ServiceRequest::Signal {
            name: body.name,
            signal,
        },
    )
    .await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

/// `SIGTERM`, `TERM` or `15` as a signal number.
pub(crate) fn signal_number(name: &str) -> Result<i32, ApiError> {
    hull_proto::signal_number(name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unknown signal {name:?}: use a name like SIGTERM or SIGHUP"
        ))
    })
}

/// The stream a put or start answers: the service's log from `since_ms`
/// for `duration`, then `complete`.
fn follow(state: &Shared, name: &str, since_ms: i64, duration: Option<Duration>) -> Response<Body> {
    let (events, response) = ndjson::stream();
    let duration = duration.unwrap_or_default().min(MAX_DURATION);
    let (state, name) = (state.clone(), name.to_string());
    tokio::spawn(async move {
        if !duration.is_zero() {
            let _ =
                tokio::time::timeout(duration, stream_log(&state, &name, since_ms, &events)).await;
        }
        let status = match connect(&state).await {
            Ok(mut c) => c.services(ServiceRequest::Show(name.clone())).await.ok(),
            Err(_) => None,
        };
        let now = status
            .as_ref()
            .and_then(|s| s.first())
            .map(|s| status_word(&s.state));
        events.send(json!({
            "type": "complete",
            "data": now.map(|w| format!("{name} is {w}")),
            "timestamp": now_ms(),
        }));
    });
    response
}

/// Sends the service's log records from `since_ms` on as events, until the
/// caller's timeout ends it.
async fn stream_log(state: &Shared, name: &str, since_ms: i64, events: &Events) {
    loop {
        let Ok(mut client) = connect(state).await else {
            return;
        };
        let logs = ClientMsg::Logs {
            source: name.to_string(),
            follow: true,
            tail: None,
            stream: None,
            since_ms: Some(since_ms),
            exec_id: None,
        };
        match client.request(logs).await {
            Ok(first) => {
                let mut next = Ok(first);
                while let Ok(DaemonMsg::LogRecords(records)) = next {
                    for r in records {
                        events.send(log_event(&r));
                    }
                    next = hull_client::next(&mut client.reader).await;
                }
                return;
            }
            // Its log appears with its first start.
            Err(_) => tokio::time::sleep(LOG_RETRY).await,
        }
    }
}

fn log_event(r: &hull_proto::LogRecord) -> Value {
    let kind = match (r.marker, r.stream) {
        (Some(LogMarker::Start | LogMarker::Restart), _) => "started",
        (Some(_), _) => "info",
        (None, Stream::Stdout) => "stdout",
        (None, Stream::Stderr) => "stderr",
    };
    json!({"type": kind, "data": format!("{}\n", r.line), "timestamp": r.ts_ms})
}
