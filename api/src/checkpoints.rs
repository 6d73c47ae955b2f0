//! `/v1/sprites/{name}/checkpoint[s]`: hull's checkpoints (v1, v2, ...) as
//! the Sprites API shows them. Create, restore and push answer a stream of
//! NDJSON events (`info`, then `complete` or `error`).

use hull_proto::{CheckpointInfo, CheckpointListing};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::ndjson::{self, rfc3339};
use crate::response::{json_response, Body};
use crate::Shared;

/// The largest body of a create: a comment.
const MAX_CREATE_BODY: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    comment: Option<String>,
}

/// A checkpoint as the SDKs read it (`id`, `create_time`, `comment`), with
/// what hull knows beyond that.
fn describe(c: &CheckpointInfo, head: Option<&str>) -> Value {
    json!({
        "id": c.id,
        "create_time": rfc3339(c.created_ms),
        "comment": c.comment,
        "parent": c.parent,
        "auto": c.auto,
        "current": head == Some(c.id.as_str()),
        "services": c.services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        "remote_id": c.remote_id,
        "parent_remote_id": c.parent_remote_id,
        "remote_state": c.remote_state,
        "remote_error": c.remote_error,
        "origin": c.origin,
    })
}

async fn listing(state: &Shared) -> Result<CheckpointListing, ApiError> {
    let mut client = state.connect().await?;
    client.checkpoint_list().await.map_err(ApiError::daemon)
}

/// The checkpoint `id`, or a 404 that says which exist.
async fn find(state: &Shared, id: &str) -> Result<(CheckpointInfo, Option<String>), ApiError> {
    let listing = listing(state).await?;
    let known: Vec<&str> = listing.checkpoints.iter().map(|c| c.id.as_str()).collect();
    let message = format!("no checkpoint {id:?} (there are: {})", known.join(", "));
    let found = listing.checkpoints.iter().find(|c| c.id == id).cloned();
    found
        .map(|c| (c, listing.head.clone()))
        .ok_or_else(|| ApiError::not_found(message))
}

pub async fn list(state: &Shared, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    if req.uri().query().is_some_and(|q| q.contains("history=")) {
        return Err(ApiError::bad_request(
            "hull keeps no restore history per checkpoint: list without ?history=",
        ));
    }
    let listing = listing(state).await?;
    let head = listing.head.as_deref();
    let all: Vec<Value> = listing
        .checkpoints
        .iter()
        .map(|c| describe(c, head))
        .collect();
    Ok(json_response(StatusCode::OK, &Value::Array(all)))
}

pub async fn get(state: &Shared, id: &str) -> Result<Response<Body>, ApiError> {
    let (checkpoint, head) = find(state, id).await?;
    Ok(json_response(
        StatusCode::OK,
        &describe(&checkpoint, head.as_deref()),
    ))
}

pub async fn delete(state: &Shared, id: &str) -> Result<Response<Body>, ApiError> {
    let mut client = state.connect().await?;
    client
        .checkpoint_delete(id)
        .await
        .map_err(ApiError::daemon)?;
    Ok(crate::response::empty_response(StatusCode::NO_CONTENT))
}

pub async fn create(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: CreateBody = crate::body::read_as(req, MAX_CREATE_BODY).await?;
    let mut client = state.connect().await?;
    let (events, response) = ndjson::stream();
    events.send(json!({"type": "info", "data": "Creating checkpoint"}));
    tokio::spawn(async move {
        match client.checkpoint_create(body.comment).await {
            Ok(made) => {
                let id = &made.checkpoint.id;
                events.send(json!({"type": "info", "data": format!(
                    "Checkpoint {id} taken in {:.1} ms (the sandbox was frozen for {:.1} ms)",
                    made.total_ms, made.frozen_ms
                )}));
                events.send(json!({
                    "type": "complete",
                    "data": format!("Checkpoint {id} created"),
                    "id": id,
                    "create_time": rfc3339(made.checkpoint.created_ms),
                }));
            }
            Err(e) => events.send(json!({"type": "error", "error": ApiError::daemon(e).message})),
        }
    });
    Ok(response)
}

pub async fn restore(state: &Shared, id: &str) -> Result<Response<Body>, ApiError> {
    let (checkpoint, _) = find(state, id).await?;
    let mut client = state.connect().await?;
    let (events, response) = ndjson::stream();
    events.send(json!({"type": "info", "data": format!(
        "Restoring {}: the current state is saved as a checkpoint first",
        checkpoint.id
    )}));
    tokio::spawn(async move {
        match client.checkpoint_restore(&checkpoint.id).await {
            Ok(done) => {
                events.send(json!({"type": "info", "data": format!(
                    "Restored {} in {:.1} ms; the state before it is checkpoint {} (restore that to undo)",
                    done.restored, done.total_ms, done.undo
                )}));
                events.send(json!({
                    "type": "complete",
                    "data": format!("Restored {}", done.restored),
                    "id": done.restored,
                    "undo": done.undo,
                }));
            }
            Err(e) => events.send(json!({"type": "error", "error": ApiError::daemon(e).message})),
        }
    });
    Ok(response)
}

/// Pushes the checkpoint to the remote now: an `info` event per progress
/// report hulld sends, then `complete` with its remote id.
pub async fn push(state: &Shared, id: &str) -> Result<Response<Body>, ApiError> {
    let (checkpoint, _) = find(state, id).await?;
    let mut client = state.connect().await?;
    let (events, response) = ndjson::stream();
    events.send(json!({"type": "info", "data": format!("Pushing {}", checkpoint.id)}));
    tokio::spawn(async move {
        let pushed = client
            .checkpoint_push(Some(checkpoint.id.clone()), |p| {
                events.send(json!({"type": "info", "data": format!(
                    "{} bytes read, {} chunks: {} uploaded ({} bytes), {} already in the remote",
                    p.bytes_read, p.chunks, p.chunks_uploaded, p.bytes_uploaded, p.chunks_present
                )}));
            })
            .await;
        match pushed {
            Ok(done) => events.send(json!({
                "type": "complete",
                "data": format!(
                    "Checkpoint {} pushed: {} chunks, {} uploaded, {} already there",
                    done.checkpoint, done.chunks, done.chunks_uploaded, done.chunks_present
                ),
                "id": done.checkpoint,
                "remote_id": done.remote_id,
            })),
            Err(e) => events.send(json!({"type": "error", "error": ApiError::daemon(e).message})),
        }
    });
    Ok(response)
}
