//! The control WebSocket, `GET /v1/sprites/{name}/control`: one kept
//! connection that runs operations one after another, as sprites-py's
//! `control_mode` and the agent-framework plugins use it. An operation
//! starts with the text frame `control:{"type":"op.start","op":"exec",
//! "args":{...}}`; its frames then flow as on an exec WebSocket, and it
//! ends with `control:{"type":"op.complete","args":{"exitCode":N}}` or
//! `control:{"type":"op.error","args":{"error":"..."}}`.
//!
//! Only `exec` is served; file operations are answered with `op.error`.
//! The Go SDK's port proxy also runs here: a bare
//! `{"type": "start", "operation": "proxy", "params": {"host", "port"}}`
//! text, answered and carried as on the proxy route until the client's
//! `{"type": "release"}`.

use futures::{Sink, SinkExt, Stream, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::error::ApiError;
use crate::exec::{self, ExecParams, ExecStart, PumpEnd};
use crate::response::Body;
use crate::{proxy, ws, Shared};

/// What starts every control message.
pub const PREFIX: &str = "control:";

/// `GET /v1/sprites/{name}/control`.
pub async fn serve(state: &Shared, mut req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let state = state.clone();
    ws::serve_upgraded(
        &mut req,
        move |socket| async move { run(&state, socket).await },
    )
}

fn control(kind: &str, args: Value) -> Message {
    Message::text(format!("{PREFIX}{}", json!({"type": kind, "args": args})))
}

fn op_error(error: &str) -> Message {
    control("op.error", json!({ "error": error }))
}

/// Whether the connection goes on after an operation.
enum Next {
    Continue,
    Close,
}

async fn run(state: &Shared, socket: ws::Ws) {
    let (mut sink, mut stream) = socket.split();
    while let Some(frame) = stream.next().await {
        let text = match frame {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(_)) | Err(_) => return,
            // Input an operation's client sent as it ended (its stdin EOF
            // after a quick exit, say) arrives after that end: dropped.
            Ok(_) => continue,
        };
        let Some(envelope) = text.as_str().strip_prefix(PREFIX) else {
            // The Go SDK's proxy starts with a bare JSON message.
            if let Some(params) = proxy_start(&text) {
                match proxy::on_control(state, &params, &mut sink, &mut stream).await {
                    proxy::RelayEnd::Released => continue,
                    proxy::RelayEnd::Closed => return,
                }
            }
            continue;
        };
        let next = match serde_json::from_str::<Value>(envelope) {
            Ok(msg) if msg["type"] == "op.start" => {
                operation(state, &msg, &mut sink, &mut stream).await
            }
            Ok(msg) => {
                send(
                    &mut sink,
                    op_error(&format!(
                        "unknown control message type {}: a client sends op.start",
                        msg["type"]
                    )),
                )
                .await
            }
            Err(e) => {
                send(
                    &mut sink,
                    op_error(&format!("the control message is not JSON: {e}")),
                )
                .await
            }
        };
        if let Next::Close = next {
            return;
        }
    }
}

/// The params of `{"type": "start", "operation": "proxy", "params": {...}}`.
fn proxy_start(text: &str) -> Option<Value> {
    let msg: Value = serde_json::from_str(text).ok()?;
    (msg["type"] == "start" && msg["operation"] == "proxy").then(|| msg["params"].clone())
}

async fn send<Si>(sink: &mut Si, msg: Message) -> Next
where
    Si: Sink<Message, Error = WsError> + Unpin,
{
    match sink.send(msg).await {
        Ok(()) => Next::Continue,
        Err(_) => Next::Close,
    }
}

async fn operation<Si, St>(state: &Shared, msg: &Value, sink: &mut Si, stream: &mut St) -> Next
where
    Si: Sink<Message, Error = WsError> + Unpin,
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let op = msg["op"].as_str().unwrap_or_default();
    if op != "exec" {
        let why = format!(
            "operation {op:?} is not served on the control connection: it runs exec; use the HTTP routes for the rest"
        );
        return send(sink, op_error(&why)).await;
    }
    let empty = serde_json::Map::new();
    let args = msg["args"].as_object().unwrap_or(&empty);
    // With an `id`, the Go SDK's attach to a running session.
    let session = match session_id(args) {
        Ok(id) => id,
        Err(why) => return send(sink, op_error(&why)).await,
    };
    let started = match session {
        Some(id) => exec::attach_session(state, id, false)
            .await
            .map(|(exec, params)| (Ok(ExecStart::Running(Box::new(exec))), params)),
        None => match ExecParams::from_args(args) {
            Ok(params) => Ok((exec::start(state, &params).await, params)),
            Err(e) => Err(e),
        },
    };
    let (started, params) = match started {
        Ok(started) => started,
        Err(e) => return send(sink, op_error(&e.message)).await,
    };
    let framing = exec::Framing {
        tty: params.tty.is_some(),
    };
    let mut exec = match started {
        Ok(ExecStart::Running(exec)) => exec,
        Ok(ExecStart::SpawnFailed { code, message }) => {
            let stderr = framing.output(hull_proto::Stream::Stderr, message.into_bytes());
            if let Next::Close = send(sink, stderr).await {
                return Next::Close;
            }
            return complete(sink, framing, code).await;
        }
        Err(e) => return send(sink, op_error(&e.message)).await,
    };
    if let Next::Close = send(sink, exec.session_info(&params)).await {
        exec.abandon(params.run_after_disconnect).await;
        return Next::Close;
    }
    match exec.pump(framing, sink, stream).await {
        PumpEnd::Ended(end) => match exec::exit_code(&end) {
            Ok(code) => complete(sink, framing, code).await,
            Err(why) => send(sink, op_error(&why)).await,
        },
        PumpEnd::ClientGone => {
            exec.abandon(params.run_after_disconnect).await;
            Next::Close
        }
        PumpEnd::BadFrame(why) => {
            let _ = sink.send(ws::close(CloseCode::Unsupported, &why)).await;
            exec.abandon(Some(std::time::Duration::ZERO)).await;
            Next::Close
        }
        PumpEnd::Failed(e) => {
            let why = format!("hulld: {}", hull_proto::error_chain(&e));
            send(sink, op_error(&why)).await
        }
    }
}

/// The session an exec operation attaches to, if it names one.
fn session_id(args: &serde_json::Map<String, Value>) -> Result<Option<u64>, String> {
    let id = match args.get("id") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.parse().ok(),
        Some(Value::Number(n)) => n.as_u64(),
        Some(_) => None,
    };
    id.map(Some)
        .ok_or_else(|| format!("id {} is not a session id", args["id"]))
}

/// The exit frame where the framing has one, then `op.complete`.
async fn complete<Si>(sink: &mut Si, framing: exec::Framing, code: i32) -> Next
where
    Si: Sink<Message, Error = WsError> + Unpin,
{
    if let Some(exit) = framing.exit(code, false) {
        if let Next::Close = send(sink, exit).await {
            return Next::Close;
        }
    }
    send(sink, control("op.complete", json!({ "exitCode": code }))).await
}
