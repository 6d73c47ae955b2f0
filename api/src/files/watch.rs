//! `GET .../fs/watch?path=&recursive=`, a hull extension: inotify events
//! under a directory of the sandbox, one JSON text message each, until the
//! client closes. hulld watches (`Files(Watch)`, one inotify instance for
//! every client, its caps); this relays its events to the WebSocket, one
//! at a time: a client that reads slowly holds up the connection to
//! hulld, whose bounded queue for it then drops events and says so
//! (`overflow`).

use futures::{SinkExt, StreamExt};
use hull_proto::{DaemonMsg, FileEvent};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// The JSON message of `event`.
fn message(event: &FileEvent) -> String {
    match event {
        FileEvent::Change {
            change,
            path,
            is_dir,
        } => json!({"type": change.name(), "path": path, "isDir": is_dir}),
        FileEvent::Overflow => json!({"type": "overflow"}),
        FileEvent::Gone => json!({"type": "gone"}),
        FileEvent::Incomplete { message } | FileEvent::Failed { message } => {
            json!({"type": "error", "message": message})
        }
    }
    .to_string()
}

/// Carries hulld's events to the WebSocket until either side ends; the
/// connection to hulld closes with it, which ends the watch there.
pub async fn relay(mut ws: crate::ws::Ws, mut client: hull_client::Client) {
    loop {
        tokio::select! {
            event = hull_client::next(&mut client.reader) => {
                let event = match event {
                    Ok(DaemonMsg::FileEvent(event)) => event,
                    Ok(other) => FileEvent::Failed {
                        message: format!("unexpected reply from hulld: {other:?}"),
                    },
                    Err(e) => FileEvent::Failed {
                        message: format!("the watch failed: {}", hull_proto::error_chain(&e)),
                    },
                };
                if ws.send(Message::text(message(&event))).await.is_err() {
                    return;
                }
                if event.is_last() {
                    let _ = ws.close(None).await;
                    return;
                }
            }
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
