//! `/v1/sprites`: the one sandbox this hulld serves, as the Sprites API
//! describes a sprite.

use hull_proto::{InnerState, StatusReport};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::response::{json_response, Body};
use crate::Shared;

/// The largest request body of a create: a name and a few settings.
const MAX_CREATE_BODY: usize = 64 * 1024;

async fn status(state: &Shared) -> Result<StatusReport, ApiError> {
    let mut client = state.connect().await?;
    client.status().await.map_err(ApiError::daemon)
}

/// A sprite's `status`: `running` while the inner runs, `warm` while it
/// starts, bounces or retries a failed start (it comes back by itself),
/// `cold` when stopped.
fn sprite_status(state: &InnerState) -> &'static str {
    match state {
        InnerState::Running => "running",
        InnerState::Starting | InnerState::Stopping | InnerState::Failed => "warm",
        _ => "cold",
    }
}

fn describe(state: &Shared, report: &StatusReport) -> Value {
    json!({
        "id": state.settings.sandbox_name,
        "name": state.settings.sandbox_name,
        "organization": "",
        "status": sprite_status(&report.state),
        "url": report.api,
        "version": report.daemon_version,
        "labels": [],
    })
}

pub async fn get(state: &Shared) -> Result<Response<Body>, ApiError> {
    let report = status(state).await?;
    Ok(json_response(StatusCode::OK, &describe(state, &report)))
}

pub async fn list(state: &Shared) -> Result<Response<Body>, ApiError> {
    let report = status(state).await?;
    let sprite = describe(state, &report);
    let mut counts = json!({"running": 0, "warm": 0, "cold": 0});
    counts[sprite_status(&report.state)] = json!(1);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "sprites": [sprite],
            "has_more": false,
            "next_continuation_token": null,
            "running": counts["running"],
            "warm": counts["warm"],
            "cold": counts["cold"],
        }),
    ))
}

/// Creating the sandbox this server hosts is a no-op that describes it;
/// any other name is refused, since one hulld is one sandbox.
pub async fn create(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = crate::body::read_json(req, MAX_CREATE_BODY).await?;
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("the body needs a \"name\""))?;
    if name != state.settings.sandbox_name {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "single_sandbox",
            format!(
                "this server hosts one sandbox, {:?}; it cannot create {name:?}",
                state.settings.sandbox_name
            ),
        ));
    }
    get(state).await
}
