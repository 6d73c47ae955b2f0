//! Exec over WebSocket, `GET /v1/sprites/{name}/exec`, in the Sprites SDKs'
//! framing. Without a TTY every binary frame starts with a stream id (0
//! stdin, 1 stdout, 2 stderr, 3 exit with the code in the next byte, 4
//! stdin EOF); with a TTY binary frames are the terminal's raw bytes and
//! the exit is a text frame. Text frames carry JSON: `resize` and `signal`
//! from the client, `session_info` and `exit` from the server.
//!
//! An exec is one [`hull_proto::ExecRequest`] over its own in-process
//! connection to hulld, so exit codes, spawn errors and an inner that stops
//! under the command come from hulld's own exec code. Each direction is
//! pumped on its own and waits for the other end to take what it sends: a
//! client that does not read stalls the command's output, not hulld's
//! memory.

use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use hull_client::{Client, ClientError};
use hull_proto::{ClientMsg, DaemonMsg, ErrorKind, ExecEnd, ExecRequest, ExecSpec, WinSize};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::error::ApiError;
use crate::response::Body;
use crate::{ws, Shared};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const EXIT: u8 = 3;
const STDIN_EOF: u8 = 4;

/// How long a command without a TTY runs on after its client vanished,
/// unless `max_run_after_disconnect` says otherwise (the Sprites default).
const DEFAULT_RUN_AFTER_DISCONNECT: Duration = Duration::from_secs(10);

/// After the kill of an abandoned command, how long its end is waited for
/// before the connection to hulld is dropped (which hangs up on it too).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How long the client has to answer our close before the connection is
/// dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What to run and how, from the query of an exec or the args of a
/// control connection's `op.start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecParams {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dir: Option<String>,
    pub tty: Option<WinSize>,
    /// The client will send input; without it, stdin is closed at once.
    pub stdin: bool,
    /// How long the command runs on after its client vanished, then
    /// killed; `None`: it runs on as a detached session, which
    /// `GET .../exec/ID` attaches to again.
    pub run_after_disconnect: Option<Duration>,
}

impl ExecParams {
    /// From `cmd=a&cmd=b&env=K=V&dir=/&tty=true&rows=24&cols=80&stdin=true
    /// &max_run_after_disconnect=10s` (`path`, the program, is `cmd`'s first).
    pub fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        let pairs = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()));
        Self::from_pairs(pairs)
    }

    /// From an `op.start`'s args: the query's keys, with lists for `cmd`
    /// and `env` and strings, booleans or numbers for the rest.
    pub fn from_args(args: &serde_json::Map<String, Value>) -> Result<Self, ApiError> {
        let mut pairs = Vec::new();
        for (key, value) in args {
            let values = match value {
                Value::Array(items) => items.clone(),
                Value::Object(map) if key == "env" => map
                    .iter()
                    .map(|(k, v)| Value::String(format!("{k}={}", v.as_str().unwrap_or(""))))
                    .collect(),
                other => vec![other.clone()],
            };
            for v in values {
                let v = match v {
                    Value::String(s) => s,
                    Value::Null => continue,
                    other => other.to_string(),
                };
                pairs.push((key.clone(), v));
            }
        }
        Self::from_pairs(pairs.into_iter())
    }

    fn from_pairs(pairs: impl Iterator<Item = (String, String)>) -> Result<Self, ApiError> {
        let mut argv = Vec::new();
        let mut path = None;
        let mut env = Vec::new();
        let mut dir = None;
        let (mut tty, mut rows, mut cols) = (false, 24u16, 80u16);
        let mut stdin = true;
        let mut run_after_disconnect = None;
        for (key, value) in pairs {
            match key.as_str() {
                "cmd" => argv.push(value),
                "path" => path = Some(value),
                "env" => match value.split_once('=') {
                    Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
                    _ => return Err(bad_param("env", &value, "KEY=VALUE")),
                },
                "dir" => dir = Some(value).filter(|d| !d.is_empty()),
                "tty" => tty = parse_bool("tty", &value)?,
                "stdin" => stdin = parse_bool("stdin", &value)?,
                "rows" => rows = parse_size("rows", &value)?,
                "cols" => cols = parse_size("cols", &value)?,
                "max_run_after_disconnect" => {
                    run_after_disconnect = Some(parse_duration(&value).ok_or_else(|| {
                        bad_param(
                            "max_run_after_disconnect",
                            &value,
                            "seconds or a duration such as 500ms, 10s, 5m, 1h",
                        )
                    })?)
                }
                // Parameters of later SDKs are not errors: they are left
                // to the defaults.
                _ => {}
            }
        }
        if argv.is_empty() {
            argv.extend(path);
        }
        if argv.is_empty() {
            return Err(ApiError::bad_request(
                "no command: give cmd=PROGRAM, and cmd=ARG for each argument",
            ));
        }
        let tty = tty.then_some(WinSize { rows, cols });
        // A terminal's session outlives its client, to be attached again;
        // a command without one runs on for a while, then is killed.
        let default_grace = match tty {
            Some(_) => None,
            None => Some(DEFAULT_RUN_AFTER_DISCONNECT),
        };
        Ok(ExecParams {
            argv,
            env,
            dir,
            tty,
            stdin,
            run_after_disconnect: run_after_disconnect.or(default_grace),
        })
    }

    fn request(&self) -> ExecRequest {
        ExecRequest {
            port_events: true,
            ..ExecSpec {
                argv: self.argv.clone(),
                env: self.env.clone(),
                cwd: self.dir.clone(),
                user: None,
                tty: self.tty,
            }
            .into()
        }
    }

    fn framing(&self) -> Framing {
        Framing {
            tty: self.tty.is_some(),
        }
    }
}

/// The SDKs' `port_opened` / `port_closed` text frame.
fn port_frame(notice: &hull_proto::PortNotice) -> Message {
    let kind = if notice.opened {
        "port_opened"
    } else {
        "port_closed"
    };
    Message::text(
        json!({
            "type": kind,
            "port": notice.port,
            "address": notice.address,
            "pid": notice.pid,
        })
        .to_string(),
    )
}

fn bad_param(key: &str, value: &str, expected: &str) -> ApiError {
    ApiError::bad_request(format!("{key}={value:?} is not valid: expected {expected}"))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" | "" => Ok(false),
        _ => Err(bad_param(key, value, "true or false")),
    }
}

fn parse_size(key: &str, value: &str) -> Result<u16, ApiError> {
    value
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| bad_param(key, value, "a number of cells from 1 to 65535"))
}

/// Seconds (`10`, `1.5`) or a Go-style duration (`500ms`, `10s`, `1m30s`).
fn parse_duration(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let mut total = Duration::ZERO;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|n| *n > 0)?;
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return None,
        };
        total = total.checked_add(Duration::try_from_secs_f64(secs).ok()?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// How the frames of one exec look: by stream id, or raw with a TTY.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    pub tty: bool,
}

/// What a frame from the client asks for.
enum Input {
    Send(ClientMsg),
    /// Pings, pongs, and JSON messages of types this server does not act on.
    Nothing,
    Gone,
}

impl Framing {
    pub(crate) fn output(self, stream: hull_proto::Stream, data: Vec<u8>) -> Message {
        if self.tty {
            return Message::Binary(data.into());
        }
        let id = match stream {
            hull_proto::Stream::Stdout => STDOUT,
            hull_proto::Stream::Stderr => STDERR,
        };
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(id);
        frame.extend_from_slice(&data);
        Message::Binary(frame.into())
    }

    /// The exit frame; `None` where the framing has none (a TTY on a
    /// control connection ends with `op.complete` alone).
    pub(crate) fn exit(self, code: i32, text_exit: bool) -> Option<Message> {
        if self.tty {
            return text_exit
                .then(|| Message::text(json!({"type": "exit", "exit_code": code}).to_string()));
        }
        let byte = u8::try_from(code).unwrap_or(u8::MAX);
        Some(Message::Binary(vec![EXIT, byte].into()))
    }

    fn parse(self, frame: Message) -> Result<Input, String> {
        match frame {
            Message::Binary(data) if self.tty => Ok(Input::Send(ClientMsg::Stdin(data.to_vec()))),
            Message::Binary(data) => match data.first() {
                Some(&STDIN) => Ok(Input::Send(ClientMsg::Stdin(data[1..].to_vec()))),
                Some(&STDIN_EOF) => Ok(Input::Send(ClientMsg::StdinEof)),
                Some(other) => Err(format!(
                    "a binary frame of stream {other}: a client sends 0 (stdin) or 4 (stdin EOF)"
                )),
                None => {
                    Err("an empty binary frame: a client's frames start with a stream id".into())
                }
            },
            Message::Text(text) => parse_text(text.as_str()),
            Message::Close(_) => Ok(Input::Gone),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(Input::Nothing),
        }
    }
}

fn parse_text(text: &str) -> Result<Input, String> {
    if text.starts_with(crate::control::PREFIX) {
        return Err("a control message while an operation runs: one operation at a time".into());
    }
    let msg: Value = serde_json::from_str(text).map_err(|e| {
        format!("a text frame that is not JSON ({e}): text frames carry resize and signal messages")
    })?;
    match msg["type"].as_str() {
        Some("resize") => {
            let cell = |key: &str| {
                msg[key]
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("a resize with {key}={}: expected 1 to 65535", msg[key]))
            };
            Ok(Input::Send(ClientMsg::Resize(WinSize {
                rows: cell("rows")?,
                cols: cell("cols")?,
            })))
        }
        Some("signal") => parse_signal(&msg["signal"]).map(|s| Input::Send(ClientMsg::Signal(s))),
        _ => Ok(Input::Nothing),
    }
}

/// `TERM`, `SIGTERM` or `15`.
fn parse_signal(value: &Value) -> Result<i32, String> {
    let bad = || format!("a signal of {value}: expected a name such as TERM or INT, or a number");
    if let Some(n) = value.as_i64() {
        return nix::sys::signal::Signal::try_from(i32::try_from(n).map_err(|_| bad())?)
            .map(|s| s as i32)
            .map_err(|_| bad());
    }
    let name = value.as_str().ok_or_else(bad)?.trim().to_ascii_uppercase();
    if let Ok(n) = name.parse::<i32>() {
        return parse_signal(&json!(n));
    }
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| bad())
}

/// An exec hulld has started, on its own connection.
pub struct Exec {
    client: Client,
    pub pid: i32,
    /// Its session's id (`GET .../exec`, `hull sessions attach ID`).
    pub session: u64,
    /// Its id in hulld's `exec` log (`hull logs exec:ID`), when logged.
    pub exec_id: Option<u64>,
    /// This client's input reaches the command: it started it, or attached
    /// as the writer. A watcher is not the session's owner.
    pub owner: bool,
}

/// What starting an exec gave.
pub enum ExecStart {
    Running(Box<Exec>),
    /// The program could not be started: the client hears it as a shell
    /// would tell it, a message on stderr and the shell's exit code.
    SpawnFailed {
        code: i32,
        message: String,
    },
}

/// Asks hulld to start `params`; errors other than the program's own are
/// the request's.
pub async fn start(state: &Shared, params: &ExecParams) -> Result<ExecStart, ApiError> {
    let mut client = state.connect().await?;
    let begun = match client.exec_begin(params.request()).await {
        Ok(begun) => begun,
        Err(ClientError::Daemon(report)) => {
            if let ErrorKind::Spawn(kind) = report.kind {
                return Ok(ExecStart::SpawnFailed {
                    code: kind.shell_code(),
                    message: format!("hull: {}\n", report.message),
                });
            }
            return Err(ApiError::daemon(ClientError::Daemon(report)));
        }
        Err(e @ ClientError::InnerStopped(_)) => {
            return Err(ApiError::new(
                hyper::StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_unavailable",
                e.to_string(),
            ))
        }
        Err(e) => return Err(ApiError::daemon(e)),
    };
    if !params.stdin && params.tty.is_none() {
        client
            .writer
            .send(ClientMsg::StdinEof)
            .await
            .map_err(|e| ApiError::daemon(ClientError::Io(e)))?;
    }
    Ok(ExecStart::Running(Box::new(Exec {
        client,
        pid: begun.pid,
        session: begun.session,
        exec_id: begun.exec_id,
        owner: true,
    })))
}

/// How pumping an exec ended.
pub enum PumpEnd {
    Ended(ExecEnd),
    /// The client closed, or its connection broke.
    ClientGone,
    /// The client sent a frame this protocol has no place for.
    BadFrame(String),
    /// The connection to hulld failed.
    Failed(ClientError),
}

enum Down {
    Ended(ExecEnd),
    SinkFailed,
    Failed(ClientError),
    Stopped,
}

enum Up {
    Gone,
    Bad(String),
    Failed(ClientError),
    Stopped,
}

impl Exec {
    /// The `session_info` text frame: the exec's id in hulld's log.
    pub fn session_info(&self, params: &ExecParams) -> Message {
        let size = params.tty.unwrap_or(WinSize { rows: 0, cols: 0 });
        Message::text(
            json!({
                "type": "session_info",
                "session_id": self.session.to_string(),
                "exec_id": self.exec_id,
                "pid": self.pid,
                "command": params.argv.join(" "),
                "tty": params.tty.is_some(),
                "rows": size.rows,
                "cols": size.cols,
                "is_owner": self.owner,
            })
            .to_string(),
        )
    }

    /// Passes frames both ways until the exec ends or either side goes.
    pub async fn pump<Si, St>(
        &mut self,
        framing: Framing,
        sink: &mut Si,
        stream: &mut St,
    ) -> PumpEnd
    where
        Si: Sink<Message, Error = WsError> + Unpin,
        St: Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let (stop_up, stop_down) = (Notify::new(), Notify::new());
        let Client { reader, writer, .. } = &mut self.client;
        let down = async {
            let r = pump_down(reader, sink, framing, &stop_down).await;
            stop_up.notify_one();
            r
        };
        let up = async {
            let r = pump_up(stream, writer, framing, &stop_up).await;
            stop_down.notify_one();
            r
        };
        match tokio::join!(down, up) {
            (Down::Ended(end), _) => PumpEnd::Ended(end),
            (Down::SinkFailed, _) | (Down::Stopped, Up::Gone | Up::Stopped) => PumpEnd::ClientGone,
            (Down::Failed(e), _) | (Down::Stopped, Up::Failed(e)) => PumpEnd::Failed(e),
            (Down::Stopped, Up::Bad(why)) => PumpEnd::BadFrame(why),
        }
    }

    /// The client is gone: the command runs on for `grace`, its output
    /// dropped, and is then killed; with no grace it is detached and runs
    /// on as a session.
    pub async fn abandon(mut self, grace: Option<Duration>) {
        let Some(grace) = grace else {
            // hulld keeps a detached session; the reply is not waited for.
            let _ = self.client.writer.send(ClientMsg::Detach).await;
            return;
        };
        if drain_until(&mut self.client, Instant::now() + grace).await {
            return;
        }
        tracing::debug!(pid = self.pid, "killing an exec its client left");
        if self
            .client
            .writer
            .send(ClientMsg::Signal(nix::sys::signal::Signal::SIGKILL as i32))
            .await
            .is_ok()
        {
            drain_until(&mut self.client, Instant::now() + KILL_WAIT).await;
        }
    }
}

/// Reads the exec's messages until it ends (true), the connection fails
/// (true: hulld has ended the session) or `deadline` passes (false).
async fn drain_until(client: &mut Client, deadline: Instant) -> bool {
    loop {
        match tokio::time::timeout_at(deadline, hull_client::next(&mut client.reader)).await {
            Err(_) => return false,
            Ok(Ok(DaemonMsg::ExecEnded(_)) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn pump_down<Si>(
    reader: &mut hull_client::Reader,
    sink: &mut Si,
    framing: Framing,
    stop: &Notify,
) -> Down
where
    Si: Sink<Message, Error = WsError> + Unpin,
{
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.notified() => return Down::Stopped,
            msg = hull_client::next(reader) => msg,
        };
        match msg {
            Ok(DaemonMsg::Output { stream, data }) => {
                if sink.send(framing.output(stream, data)).await.is_err() {
                    return Down::SinkFailed;
                }
            }
            Ok(DaemonMsg::ExecEnded(end)) => return Down::Ended(end),
            // Output of processes the command left behind is cut after
            // hulld's linger; the client has what came before.
            Ok(DaemonMsg::OutputCut { .. }) => {}
            Ok(DaemonMsg::Port(notice)) => {
                if sink.send(port_frame(&notice)).await.is_err() {
                    return Down::SinkFailed;
                }
            }
            Ok(other) => return Down::Failed(ClientError::Unexpected(format!("{other:?}"))),
            Err(e) => return Down::Failed(e),
        }
    }
}

async fn pump_up<St>(
    stream: &mut St,
    writer: &mut hull_client::Writer,
    framing: Framing,
    stop: &Notify,
) -> Up
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.notified() => return Up::Stopped,
            frame = stream.next() => frame,
        };
        let input = match frame {
            Some(Ok(frame)) => framing.parse(frame),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "an exec's WebSocket failed");
                Ok(Input::Gone)
            }
            None => Ok(Input::Gone),
        };
        let msg = match input {
            Ok(Input::Send(msg)) => msg,
            Ok(Input::Nothing) => continue,
            Ok(Input::Gone) => return Up::Gone,
            Err(why) => return Up::Bad(why),
        };
        // hulld stops reading input while the process's stdin is full:
        // this waits with it, so the client's input stalls too.
        tokio::select! {
            biased;
            _ = stop.notified() => return Up::Stopped,
            sent = writer.send(msg) => if let Err(e) = sent {
                return Up::Failed(ClientError::Io(e));
            },
        }
    }
}

/// The exit code an end is told as, or why there is none.
pub fn exit_code(end: &ExecEnd) -> Result<i32, String> {
    match end {
        ExecEnd::Exited(status) => Ok(status.shell_code()),
        // As timeout(1) reports it.
        ExecEnd::TimedOut { .. } => Ok(124),
        ExecEnd::InnerStopped { reason } => {
            Err(format!("the sandbox stopped under the command: {reason}"))
        }
    }
}

/// `GET /v1/sprites/{name}/exec`: starts the command, then answers the
/// WebSocket handshake; a request hulld refuses is an HTTP error.
pub async fn serve(state: &Shared, mut req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let handshake = ws::handshake(&mut req)?;
    let params = ExecParams::from_query(req.uri().query())?;
    let started = start(state, &params).await?;
    // The WebSocket holds the connection's place under the caps.
    tokio::spawn(run(handshake.upgrade, started, params));
    Ok(handshake.response)
}

/// Whether `GET .../exec/ID` asks to watch (`?watch=true`) rather than
/// take the writer's role.
pub fn watch_only<B>(req: &Request<B>) -> Result<bool, ApiError> {
    let query = req.uri().query().unwrap_or("");
    let mut watch = false;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key == "watch" {
            watch = parse_bool("watch", &value)?;
        }
    }
    Ok(watch)
}

/// `GET .../exec/ID` with an upgrade: attaches to session ID, as its
/// writer or (`watch`) a viewer whose input is dropped, in the framing of
/// its terminal (or pipes): a terminal's scrollback first, then the
/// session as if it had been started here.
pub async fn attach(
    state: &Shared,
    mut req: Request<Incoming>,
    id: &str,
    watch: bool,
) -> Result<Response<Body>, ApiError> {
    let handshake = ws::handshake(&mut req)?;
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::not_found(format!("no session {id:?}")))?;
    let (exec, params) = attach_session(state, id, watch).await?;
    tokio::spawn(run(
        handshake.upgrade,
        ExecStart::Running(Box::new(exec)),
        params,
    ));
    Ok(handshake.response)
}

/// Attaches a new connection to hulld to session `id`, as its writer or
/// (`watch`) a viewer: the session as an exec, and the parameters that
/// frame it.
pub async fn attach_session(
    state: &Shared,
    id: u64,
    watch: bool,
) -> Result<(Exec, ExecParams), ApiError> {
    let mut client = state.connect().await?;
    let request = ClientMsg::Sessions(hull_proto::SessionRequest::Attach {
        id,
        writer: !watch,
        watch,
    });
    let (info, writer) = match client.request(request).await {
        Ok(DaemonMsg::SessionAttached { info, writer }) => (info, writer),
        Ok(other) => {
            return Err(ApiError::internal(format!(
                "hulld answered an attach with {other:?}"
            )))
        }
        Err(e) => return Err(ApiError::daemon(e)),
    };
    let params = ExecParams {
        argv: info.argv,
        env: Vec::new(),
        dir: info.cwd,
        // The size is the terminal's own; a client that wants another
        // sends a resize.
        tty: info.tty.then_some(WinSize { rows: 0, cols: 0 }),
        stdin: true,
        // Leaving detaches again: a session attached to outlives this
        // client as it outlived the last.
        run_after_disconnect: None,
    };
    let exec = Exec {
        client,
        pid: info.pid,
        session: info.id,
        exec_id: None,
        owner: writer,
    };
    Ok((exec, params))
}

async fn run(upgrade: ws::Upgrade, started: ExecStart, params: ExecParams) {
    let Some(socket) = ws::accept(upgrade).await else {
        if let ExecStart::Running(exec) = started {
            exec.abandon(params.run_after_disconnect).await;
        }
        return;
    };
    let (mut sink, mut stream) = socket.split();
    let framing = params.framing();
    let mut exec = match started {
        ExecStart::Running(exec) => exec,
        ExecStart::SpawnFailed { code, message } => {
            let stderr = framing.output(hull_proto::Stream::Stderr, message.into_bytes());
            let _ = sink.send(stderr).await;
            return finish(&mut sink, &mut stream, framing.exit(code, true), None).await;
        }
    };
    if sink.send(exec.session_info(&params)).await.is_err() {
        return exec.abandon(params.run_after_disconnect).await;
    }
    match exec.pump(framing, &mut sink, &mut stream).await {
        PumpEnd::Ended(end) => match exit_code(&end) {
            Ok(code) => finish(&mut sink, &mut stream, framing.exit(code, true), None).await,
            Err(why) => finish(&mut sink, &mut stream, None, Some((CloseCode::Error, why))).await,
        },
        PumpEnd::ClientGone => exec.abandon(params.run_after_disconnect).await,
        PumpEnd::BadFrame(why) => {
            tracing::debug!(%why, "closing an exec's WebSocket on a bad frame");
            let _ = sink.send(ws::close(CloseCode::Unsupported, &why)).await;
            exec.abandon(Some(Duration::ZERO)).await;
        }
        PumpEnd::Failed(e) => {
            let why = format!("hulld: {}", hull_proto::error_chain(&e));
            finish(&mut sink, &mut stream, None, Some((CloseCode::Error, why))).await
        }
    }
}

/// Sends the last frame, closes, and waits a little for the client's
/// close, so that it reads everything before the connection goes.
async fn finish<Si, St>(
    sink: &mut Si,
    stream: &mut St,
    last: Option<Message>,
    close: Option<(CloseCode, String)>,
) where
    Si: Sink<Message, Error = WsError> + Unpin,
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    if let Some(last) = last {
        if sink.send(last).await.is_err() {
            return;
        }
    }
    let (code, why) = close.unwrap_or((CloseCode::Normal, String::new()));
    if sink.send(ws::close(code, &why)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_become_an_exec_request() {
        let p = ExecParams::from_query(Some(
            "cmd=sh&cmd=-c&cmd=echo+%22a+b%22&path=sh&env=A%3D1%3D2&dir=%2Ftmp&tty=true&rows=40&cols=100&stdin=false&max_run_after_disconnect=1m30s",
        ))
        .unwrap();
        assert_eq!(p.argv, ["sh", "-c", "echo \"a b\""]);
        assert_eq!(p.env, [("A".to_string(), "1=2".to_string())]);
        assert_eq!(p.dir.as_deref(), Some("/tmp"));
        assert_eq!(
            p.tty,
            Some(WinSize {
                rows: 40,
                cols: 100
            })
        );
        assert!(!p.stdin);
        assert_eq!(p.run_after_disconnect, Some(Duration::from_secs(90)));

        let p = ExecParams::from_query(Some("path=/bin/true")).unwrap();
        assert_eq!(p.argv, ["/bin/true"]);
        assert_eq!(p.run_after_disconnect, Some(DEFAULT_RUN_AFTER_DISCONNECT));
        assert!(p.stdin && p.tty.is_none());

        for bad in [
            "",
            "cmd=x&rows=0&tty=true",
            "cmd=x&env=NOEQUALS",
            "cmd=x&tty=maybe",
            "cmd=x&max_run_after_disconnect=soon",
        ] {
            let e = ExecParams::from_query(Some(bad)).unwrap_err();
            assert_eq!(e.status, 400, "{bad}: {e}");
        }
    }

    #[test]
    fn control_args_read_like_the_query() {
        let args = json!({"cmd": ["ls", "-l"], "env": ["A=1"], "tty": "true", "rows": "30", "cols": 90, "stdin": false});
        let p = ExecParams::from_args(args.as_object().unwrap()).unwrap();
        assert_eq!(p.argv, ["ls", "-l"]);
        assert_eq!(p.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(p.tty, Some(WinSize { rows: 30, cols: 90 }));
        assert!(!p.stdin);
        // A terminal outlives its client unless asked otherwise.
        assert_eq!(p.run_after_disconnect, None);
    }

    #[test]
    fn durations_and_signals_parse_as_the_sdks_write_them() {
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
        assert_eq!(parse_signal(&json!("TERM")), Ok(15));
        assert_eq!(parse_signal(&json!("sigint")), Ok(2));
        assert_eq!(parse_signal(&json!(9)), Ok(9));
        assert_eq!(parse_signal(&json!("9")), Ok(9));
        assert!(parse_signal(&json!("NOPE")).is_err());
        assert!(parse_signal(&json!(999)).is_err());
    }

    #[test]
    fn frames_follow_the_sdk_framing() {
        let plain = Framing { tty: false };
        let tty = Framing { tty: true };
        assert_eq!(
            plain.output(hull_proto::Stream::Stderr, b"x".to_vec()),
            Message::Binary(vec![STDERR, b'x'].into())
        );
        assert_eq!(
            tty.output(hull_proto::Stream::Stdout, b"x".to_vec()),
            Message::Binary(b"x".to_vec().into())
        );
        assert_eq!(
            plain.exit(3, true),
            Some(Message::Binary(vec![EXIT, 3].into()))
        );
        assert_eq!(tty.exit(3, false), None);
        assert!(matches!(
            plain.parse(Message::Binary(vec![STDIN, b'a'].into())),
            Ok(Input::Send(ClientMsg::Stdin(d))) if d == b"a"
        ));
        assert!(matches!(
            plain.parse(Message::Binary(vec![STDIN_EOF].into())),
            Ok(Input::Send(ClientMsg::StdinEof))
        ));
        assert!(plain.parse(Message::Binary(vec![STDOUT].into())).is_err());
        assert!(plain.parse(Message::Binary(Vec::new().into())).is_err());
        assert!(plain.parse(Message::text("not json")).is_err());
        assert!(matches!(
            tty.parse(Message::text(r#"{"type":"resize","rows":5,"cols":7}"#)),
            Ok(Input::Send(ClientMsg::Resize(WinSize { rows: 5, cols: 7 })))
        ));
        assert!(matches!(
            tty.parse(Message::text(r#"{"type":"signal","signal":"INT"}"#)),
            Ok(Input::Send(ClientMsg::Signal(2)))
        ));
        assert!(matches!(
            tty.parse(Message::text(r#"{"type":"later_feature"}"#)),
            Ok(Input::Nothing)
        ));
    }
}
