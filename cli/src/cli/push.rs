//! `hull checkpoint push`: takes a checkpoint to the remote now and shows
//! the push as it goes.

use std::io::{IsTerminal, Write};

use anyhow::Result;

use super::cp::human as bytes;
use super::{print_json, Global};

pub async fn checkpoint_push(g: &Global, id: Option<String>) -> Result<()> {
    let mut c = g.connect().await?;
    let live = !g.json && std::io::stderr().is_terminal();
    let report = c
        .checkpoint_push(id, |p| {
            if live {
                let _ = write!(
                    std::io::stderr(),
                    "\r\x1b[Kpushing {}: {} read, {} chunks ({} uploaded, {} already there)   ",
                    p.checkpoint,
                    bytes(p.bytes_read),
                    p.chunks,
                    p.chunks_uploaded,
                    p.chunks_present
                );
            }
        })
        .await;
    if live {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
    let r = report?;
    if g.json {
        return print_json(&r);
    }
    outln!(
        "checkpoint {} pushed as {} ({}): {} of stream in {} chunks, {} uploaded ({}), {} already there",
        r.checkpoint,
        r.remote_id,
        match &r.base {
            Some(base) => format!("incremental from {base}"),
            None => "full".to_string(),
        },
        bytes(r.bytes_read),
        r.chunks,
        r.chunks_uploaded,
        bytes(r.bytes_uploaded),
        r.chunks_present
    );
    Ok(())
}
