//! `/v1/sprites/{name}/fs/...`: the sandbox's files, as the Sprites SDKs'
//! filesystem handles call them. Each route sends hulld `Files` requests
//! (the watch too), and hulld resolves every path under the running
//! inner's root; file contents stream both ways through a few chunks in
//! flight.

mod watch;

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::response::{json_response, Body};
use crate::Shared;
use hull_inner::files::InnerPath;
use hull_proto::{ClientMsg, DaemonMsg, FileEntry, FileKind};

/// Bytes gathered from the request before they go to hulld.
const WRITE_CHUNK: usize = 1024 * 1024;

/// Chunks in flight between the network and the file, each way.
const CHUNKS_IN_FLIGHT: usize = 8;

/// The largest JSON body of rename, copy or chmod.
const MAX_JSON_BODY: usize = 64 * 1024;

/// Answers `op` (the segment after `fs/`).
pub async fn route(
    state: &Shared,
    req: Request<Incoming>,
    op: &str,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    match (&method, op) {
        (&Method::GET, "read") => read(state, req).await,
        (&Method::PUT, "write") => write(state, req).await,
        (&Method::GET, "list") => list(state, req).await,
        (&Method::GET, "stat") => stat(state, req).await,
        (&Method::DELETE, "delete") => delete(state, req).await,
        (&Method::POST, "rename") => rename(state, req).await,
        (&Method::POST, "copy") => copy(state, req).await,
        (&Method::POST, "chmod") => chmod(state, req).await,
        (&Method::GET, "watch") => watch(state, req).await,
        (_, "read" | "write" | "list" | "stat" | "delete" | "rename" | "copy" | "chmod") => {
            Err(ApiError::method_not_allowed(&method, req.uri().path()))
        }
        _ => Err(ApiError::not_found(format!(
            "no route {}",
            req.uri().path()
        ))),
    }
}

async fn read(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = query_path(&req, "path")?;
    let mut client = state.connect().await?;
    let (size, _mode) = client
        .file_read(&path.shown)
        .await
        .map_err(ApiError::daemon)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::spawn(pump_out(client, path.shown, tx));
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let body = StreamBody::new(stream).boxed();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("content-length", HeaderValue::from(size));
    Ok(response)
}

/// Passes the file's bytes from hulld to the response until their end,
/// an error, or a client gone. The length was announced, so an error
/// ends the body short of it, which hyper answers by cutting the
/// connection: the client sees a failed read, never a short file.
async fn pump_out(
    mut client: hull_client::Client,
    shown: String,
    tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>,
) {
    loop {
        match client.file_read_next().await {
            Ok(Some(data)) => {
                if tx.send(Ok(Frame::data(Bytes::from(data)))).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(path = %shown, error = %hull_proto::error_chain(&e), "a files API read failed midway; its response is cut off");
                return;
            }
        }
    }
}

async fn write(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let query = query(&req);
    let path = path_param(&query, "path")?;
    let mode = match query.get("mode") {
        Some(m) => parse_mode(m)?,
        None => 0o644,
    };
    let make_parents = flag(&query, "mkdirParents")? || flag(&query, "mkdir")?;
    let mut client = state.connect().await?;
    client
        .file_write(&path.shown, mode, make_parents)
        .await
        .map_err(ApiError::daemon)?;
    let mut body = req.into_body();
    // The network's frames are small; hulld gets them in its own chunks.
    let mut pending = BytesMut::with_capacity(WRITE_CHUNK);
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    pending.extend_from_slice(&data);
                }
                if pending.len() >= WRITE_CHUNK {
                    client
                        .file_write_data(&pending)
                        .await
                        .map_err(ApiError::daemon)?;
                    pending.clear();
                }
            }
            // Dropping the connection mid-write leaves the file as it was.
            Some(Err(e)) => {
                return Err(ApiError::bad_request(format!(
                    "the upload of {} was cut off, so nothing was written: {e}",
                    path.shown
                )))
            }
            None => break,
        }
    }
    client
        .file_write_data(&pending)
        .await
        .map_err(ApiError::daemon)?;
    let size = client.file_write_end().await.map_err(ApiError::daemon)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"path": path.shown, "size": size, "mode": format!("{mode:04o}")}),
    ))
}

async fn list(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = query_path(&req, "path")?;
    let request = hull_proto::FileRequest::List {
        path: path.shown.clone(),
    };
    let entries = match state
        .connect()
        .await?
        .request(ClientMsg::Files(request))
        .await
    {
        Ok(DaemonMsg::FileList(entries)) => entries,
        Ok(other) => return Err(unexpected(&other)),
        Err(e) => return Err(ApiError::daemon(e)),
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "path": path.shown,
            "count": entries.len(),
            "entries": entries.iter().map(entry_json).collect::<Vec<_>>(),
        }),
    ))
}

fn unexpected(answer: &DaemonMsg) -> ApiError {
    ApiError::internal(format!("hulld answered a files request with {answer:?}"))
}

async fn stat(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = query_path(&req, "path")?;
    let entry = state
        .connect()
        .await?
        .file_stat(&path.shown)
        .await
        .map_err(ApiError::daemon)?;
    Ok(json_response(StatusCode::OK, &entry_json(&entry)))
}

/// An entry as the Sprites SDKs read one.
fn entry_json(entry: &FileEntry) -> Value {
    let kind = match entry.kind {
        // The SDKs' words.
        FileKind::File => "file",
        FileKind::Directory => "directory",
        FileKind::Symlink => "symlink",
        FileKind::Other => "other",
    };
    json!({
        "name": entry.name,
        "path": entry.path,
        "size": entry.size,
        "mode": format!("{:04o}", entry.mode),
        "modTime": crate::ndjson::rfc3339(entry.mtime.saturating_mul(1000)),
        "isDir": entry.kind == FileKind::Directory,
        "type": kind,
    })
}

/// Sends a delete, rename, copy or chmod: the entries it changed.
async fn change(state: &Shared, request: hull_proto::FileRequest) -> Result<u64, ApiError> {
    match state
        .connect()
        .await?
        .request(ClientMsg::Files(request))
        .await
    {
        Ok(DaemonMsg::FilesChanged { count }) => Ok(count),
        Ok(other) => Err(unexpected(&other)),
        Err(e) => Err(ApiError::daemon(e)),
    }
}

async fn delete(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let query = query(&req);
    let path = path_param(&query, "path")?;
    let recursive = flag(&query, "recursive")?;
    let count = change(
        state,
        hull_proto::FileRequest::Delete {
            path: path.shown.clone(),
            recursive,
        },
    )
    .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"deleted": [path.shown], "count": count}),
    ))
}

async fn rename(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = crate::body::read_json(req, MAX_JSON_BODY).await?;
    let (from, to) = (body_path(&body, "source")?, body_path(&body, "dest")?);
    change(
        state,
        hull_proto::FileRequest::Rename {
            from: from.shown.clone(),
            to: to.shown.clone(),
        },
    )
    .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"source": from.shown, "dest": to.shown}),
    ))
}

async fn copy(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = crate::body::read_json(req, MAX_JSON_BODY).await?;
    let (from, to) = (body_path(&body, "source")?, body_path(&body, "dest")?);
    let recursive = body_bool(&body, "recursive")?.unwrap_or(false);
    let count = change(
        state,
        hull_proto::FileRequest::Copy {
            from: from.shown.clone(),
            to: to.shown.clone(),
            recursive,
        },
    )
    .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"source": from.shown, "dest": to.shown, "count": count}),
    ))
}

async fn chmod(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = crate::body::read_json(req, MAX_JSON_BODY).await?;
    let path = body_path(&body, "path")?;
    let mode = match body.get("mode") {
        Some(Value::String(m)) => parse_mode(m)?,
        _ => {
            return Err(ApiError::bad_request(
                "the body needs a \"mode\" in octal, as \"0755\"",
            ))
        }
    };
    let recursive = body_bool(&body, "recursive")?.unwrap_or(false);
    let count = change(
        state,
        hull_proto::FileRequest::Chmod {
            path: path.shown.clone(),
            mode,
            recursive,
        },
    )
    .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"path": path.shown, "mode": format!("{mode:04o}"), "count": count}),
    ))
}

/// A WebSocket of inotify events under a directory (hull's addition).
async fn watch(state: &Shared, mut req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let query = query(&req);
    let path = path_param(&query, "path")?;
    let recursive = flag(&query, "recursive")?;
    let handshake = crate::ws::handshake(&mut req)?;
    let mut client = state.connect().await?;
    let request = hull_proto::FileRequest::Watch {
        path: path.shown,
        recursive,
    };
    match client.request(ClientMsg::Files(request)).await {
        Ok(DaemonMsg::FileWatching) => {}
        Ok(other) => return Err(unexpected(&other)),
        Err(e) => return Err(ApiError::daemon(e)),
    }
    tokio::spawn(async move {
        if let Some(ws) = crate::ws::accept(handshake.upgrade).await {
            watch::relay(ws, client).await;
        }
    });
    Ok(handshake.response)
}

/// The status of a files API error with `code`.
pub(crate) fn failure_status(code: &str) -> StatusCode {
    match code {
        "not_found" => StatusCode::NOT_FOUND,
        "permission_denied" => StatusCode::FORBIDDEN,
        "not_empty" | "exists" | "busy" => StatusCode::CONFLICT,
        "no_space" => StatusCode::INSUFFICIENT_STORAGE,
        "internal" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn query_path(req: &Request<Incoming>, key: &str) -> Result<InnerPath, ApiError> {
    path_param(&query(req), key)
}

fn path_param(query: &HashMap<String, String>, key: &str) -> Result<InnerPath, ApiError> {
    let path = query
        .get(key)
        .ok_or_else(|| ApiError::bad_request(format!("the query needs \"{key}\"")))?;
    InnerPath::new(path, query.get("workingDir").map(String::as_str))
        .map_err(|why| ApiError::bad_request(format!("bad \"{key}\" {path:?}: {why}")))
}

fn body_path(body: &Map<String, Value>, key: &str) -> Result<InnerPath, ApiError> {
    let path = body
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request(format!("the body needs \"{key}\", a path")))?;
    let working_dir = body.get("workingDir").and_then(Value::as_str);
    InnerPath::new(path, working_dir)
        .map_err(|why| ApiError::bad_request(format!("bad \"{key}\" {path:?}: {why}")))
}

fn body_bool(body: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::bad_request(format!(
            "\"{key}\" must be true or false, not {other}"
        ))),
    }
}

/// A query flag: absent is false; `true`/`false` (and `1`/`0`) as sent.
fn flag(query: &HashMap<String, String>, key: &str) -> Result<bool, ApiError> {
    match query.get(key).map(String::as_str) {
        None | Some("false" | "0" | "") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "\"{key}\" must be true or false, not {other:?}"
        ))),
    }
}

/// Permission bits in octal, `"0644"` or `"644"`.
fn parse_mode(mode: &str) -> Result<u32, ApiError> {
    u32::from_str_radix(mode, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "bad mode {mode:?}: permission bits in octal, as \"0644\""
            ))
        })
}
