//! `/v1/sprites/{name}/policy/network`: the sandbox's egress policy as the
//! Sprites API writes it (`{"rules": [{"domain", "action", "include"}]}`).
//! hulld checks it (`hull_network::EgressPolicy`, the one parser: a bad
//! policy is its 400), stores it as sent and returns it byte for byte (the
//! SDKs compare what they read back with what they wrote). A POST answers
//! once the firewall and the name server enforce the new policy.

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

/// The answer to a GET before any policy was set: no rules.
const NO_POLICY: &str = "{\"rules\":[]}";

pub async fn get(state: &Shared) -> Result<Response<Body>, ApiError> {
    let mut client = state.connect().await?;
    let (policy, _) = client
        .network_policy(None)
        .await
        .map_err(ApiError::daemon)?;
    let text = policy.unwrap_or_else(|| NO_POLICY.to_string());
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

pub async fn set(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let bytes = crate::body::read(req, MAX_POLICY_BODY).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("the policy is not UTF-8 text"))?;
    let mut client = state.connect().await?;
    client
        .network_policy(Some(text.to_string()))
        .await
        .map_err(ApiError::daemon)?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}
