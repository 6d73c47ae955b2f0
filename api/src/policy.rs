//! `/v1/sprites/{name}/policy/network`: the sandbox's egress policy as the
//! Sprites API writes it (`{"rules": [{"domain", "action", "include"}]}`).
//! hulld checks it (`hull_network::EgressPolicy`, the one parser: a bad
//! policy is its 400), stores it as sent and returns it byte for byte;
//! nothing enforces it yet, and every answer says so in its
//! `Hull-Policy-Enforced: false` header (a header, so that the body stays
//! exactly what was posted and the SDKs, which read the body only, take it
//! as they would from Fly).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use crate::error::ApiError;
use crate::response::{empty_response, Body};
use crate::Shared;

/// The largest policy accepted: thousands of rules.
const MAX_POLICY_BODY: usize = 256 * 1024;

/// Says whether the policy is enforced.
pub const ENFORCED_HEADER: &str = "hull-policy-enforced";

/// The answer to a GET before any policy was set: no rules.
const NO_POLICY: &str = "{\"rules\":[]}";

fn with_enforcement(mut response: Response<Body>, enforced: bool) -> Response<Body> {
    response.headers_mut().insert(
        ENFORCED_HEADER,
        HeaderValue::from_static(if enforced { "true" } else { "false" }),
    );
    response
}

pub async fn get(state: &Shared) -> Result<Response<Body>, ApiError> {
    let mut client = state.connect().await?;
    let (policy, enforced) = client
        .network_policy(None)
        .await
        .map_err(ApiError::daemon)?;
    let text = policy.unwrap_or_else(|| NO_POLICY.to_string());
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(with_enforcement(response, enforced))
}

pub async fn set(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let bytes = crate::body::read(req, MAX_POLICY_BODY).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("the policy is not UTF-8 text"))?;
    let mut client = state.connect().await?;
    let (_, enforced) = client
        .network_policy(Some(text.to_string()))
        .await
        .map_err(ApiError::daemon)?;
    Ok(with_enforcement(
        empty_response(StatusCode::NO_CONTENT),
        enforced,
    ))
}
