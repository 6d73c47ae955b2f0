//! Streamed NDJSON responses: progress events written as they happen, one
//! JSON object a line, the shape the Sprites SDKs read for checkpoints,
//! restores and services.

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use crate::response::Body;

/// Where a handler's task writes its events; the response ends when this
/// is dropped.
pub struct Events(mpsc::UnboundedSender<Bytes>);

impl Events {
    /// Writes one event. A client that went away misses it; the work the
    /// events describe goes on regardless (a restore is not half done
    /// because its caller hung up).
    pub fn send(&self, event: serde_json::Value) {
        let mut line = event.to_string().into_bytes();
        line.push(b'\n');
        let _ = self.0.send(Bytes::from(line));
    }
}

/// A 200 response whose body is what is sent on the returned [`Events`].
pub fn stream() -> (Events, Response<Body>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (line, rx))
    })
    .map(|line| Ok(Frame::data(line)));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    (Events(tx), response)
}

/// Unix milliseconds as RFC 3339 UTC (`2026-05-01T12:00:00.000Z`).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub use hull_proto::now_ms;
