//! `Files(Watch)` on the control socket: hulld's own protocol carries a
//! watch's events (the HTTP API's `fs/watch` relays the same ones).

use std::time::Duration;

use hull_outer::client::{next, ClientError, Reader};
use hull_proto::{ClientMsg, DaemonMsg, FileChange, FileEvent, FileRequest};
use hull_tests::{block_on, require_root, TestHull};

/// Reads the watch's events into `events` until `want` is among them.
async fn wait_for(reader: &mut Reader, events: &mut Vec<FileEvent>, want: FileEvent) {
    while !events.contains(&want) {
        let next = tokio::time::timeout(Duration::from_secs(10), next(reader))
            .await
            .unwrap_or_else(|_| panic!("no {want:?} within 10 s: {events:?}"));
        match next {
            Ok(DaemonMsg::FileEvent(event)) => events.push(event),
            other => panic!("{other:?} after {events:?}"),
        }
    }
}

/// `FileWatching`, an event per change under the directory, and `Gone`
/// as the last when the directory goes, after which hulld closes the
/// connection.
#[test]
fn a_watch_streams_changes_and_ends_when_its_directory_goes() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        hull.sh("mkdir -p /tmp/w").await;
        let mut c = hull.client().await;
        let request = FileRequest::Watch {
            path: "/tmp/w".into(),
            recursive: true,
        };
        let reply = c.request(ClientMsg::Files(request)).await.unwrap();
        assert!(matches!(reply, DaemonMsg::FileWatching), "{reply:?}");
        hull.sh("touch /tmp/w/a && mkdir /tmp/w/sub").await;
        let mut events = Vec::new();
        wait_for(
            &mut c.reader,
            &mut events,
            FileEvent::Change {
                change: FileChange::Create,
                path: "/tmp/w/a".into(),
                is_dir: false,
            },
        )
        .await;
        wait_for(
            &mut c.reader,
            &mut events,
            FileEvent::Change {
                change: FileChange::Create,
                path: "/tmp/w/sub".into(),
                is_dir: true,
            },
        )
        .await;
        hull.sh("rm -r /tmp/w").await;
        wait_for(&mut c.reader, &mut events, FileEvent::Gone).await;
        assert_eq!(events.last(), Some(&FileEvent::Gone), "{events:?}");
        assert!(
            matches!(next(&mut c.reader).await, Err(ClientError::Closed)),
            "the connection outlived its watch"
        );
    });
}
