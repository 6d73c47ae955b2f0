//! `hull cp`: one file between this machine and the inner, over hulld's
//! own `Files` requests, so it works on the control socket and through
//! `--url` alike. One side is `:PATH`, a path in the inner.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_proto::FileKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{print_json, Global};
use crate::client::{Client, ClientError};

/// Bytes read from a local file per message to hulld.
const LOCAL_CHUNK: usize = 1024 * 1024;

/// Files smaller than this copy without a progress line.
const PROGRESS_FROM: u64 = 4 * 1024 * 1024;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A path in the inner (`:PATH`).
    Inner(String),
    /// A path on this machine; `-` is stdin or stdout.
    Local(PathBuf),
}

impl Place {
    pub fn parse(arg: &str) -> Place {
        match arg.strip_prefix(':') {
            Some(path) => Place::Inner(path.to_string()),
            None => Place::Local(PathBuf::from(arg)),
        }
    }

    fn shown(&self) -> String {
        match self {
            Place::Inner(path) => format!(":{path}"),
            Place::Local(path) => path.display().to_string(),
        }
    }
}

/// What `--json` prints.
#[derive(serde::Serialize)]
struct Copied {
    source: String,
    destination: String,
    bytes: u64,
}

/// `hull cp SRC DST`.
pub async fn cp(g: &Global, src: &str, dst: &str) -> Result<()> {
    let (from, to) = (Place::parse(src), Place::parse(dst));
    let (bytes, destination) = match (&from, &to) {
        (Place::Local(local), Place::Inner(inner)) => upload(g, local, inner).await?,
        (Place::Inner(inner), Place::Local(local)) => download(g, inner, local).await?,
        (Place::Inner(_), Place::Inner(_)) => bail!(
            "both {src} and {dst} are in the inner: copy there with `hull exec -- cp {} {}`",
            src.trim_start_matches(':'),
            dst.trim_start_matches(':')
        ),
        (Place::Local(_), Place::Local(_)) => bail!(
            "neither {src} nor {dst} is in the inner: write a path in the inner as :PATH (`hull cp ./a.txt :/tmp/a.txt`)"
        ),
    };
    let copied = Copied {
        source: from.shown(),
        destination,
        bytes,
    };
    if g.json {
        return print_json(&copied);
    }
    if !matches!(to, Place::Local(ref p) if p.as_os_str() == "-") {
        outln!(
            "copied {} to {} ({})",
            copied.source,
            copied.destination,
            human(bytes)
        );
    }
    Ok(())
}

/// The absolute inner path `path` names: relative paths are the inner's
/// root's, as a shell started there sees them.
fn absolute(path: &str) -> Result<String> {
    if path.is_empty() {
        bail!("the path in the inner is empty: write :/PATH");
    }
    Ok(if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    })
}

/// The last name of `path`, for a copy into a directory.
fn file_name(path: &str) -> Result<&str> {
    match path.trim_end_matches('/').rsplit('/').next() {
        Some(name) if !name.is_empty() && name != "." && name != ".." => Ok(name),
        _ => bail!("{path} names no file to copy"),
    }
}

async fn upload(g: &Global, local: &Path, inner: &str) -> Result<(u64, String)> {
    let stdin = local.as_os_str() == "-";
    let (mut input, size, mode): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, _, _) = if stdin {
        (Box::new(tokio::io::stdin()), None, 0o644)
    } else {
        let file = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("cannot open {}", local.display()))?;
        let meta = file
            .metadata()
            .await
            .with_context(|| format!("cannot read {}", local.display()))?;
        if meta.is_dir() {
            bail!(
                "{} is a directory; hull cp copies one file (`tar c DIR | hull exec -i -- tar x -C /DEST` copies a tree)",
                local.display()
            );
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        (Box::new(file), Some(meta.len()), mode)
    };
    let mut target = absolute(inner)?;
    let mut c = g.connect().await?;
    // Into a directory: under the source's own name, as cp(1) does.
    let into_dir = target.ends_with('/')
        || match c.file_stat(&target).await {
            Ok(entry) => entry.kind == FileKind::Directory,
            Err(ClientError::Daemon(report))
                if report.kind == hull_proto::ErrorKind::File(libc::ENOENT) =>
            {
                false
            }
            Err(e) => return Err(e).with_context(|| format!("cannot copy to :{target}")),
        };
    if into_dir {
        if stdin {
            bail!(":{target} is a directory: name the file to write stdin to");
        }
        let name = file_name(&local.to_string_lossy())?.to_string();
        target = format!("{}/{name}", target.trim_end_matches('/'));
    }
    c.file_write(&target, mode, false)
        .await
        .with_context(|| format!("cannot write :{target}"))?;
    let mut progress = Progress::new(g, size);
    let mut buf = vec![0u8; LOCAL_CHUNK];
    let mut sent = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .await
            .with_context(|| format!("cannot read {}", local.display()))?;
        if n == 0 {
            break;
        }
        c.file_write_data(&buf[..n])
            .await
            .with_context(|| format!("cannot write :{target}"))?;
        sent += n as u64;
        progress.show(sent);
    }
    let written = c
        .file_write_end()
        .await
        .with_context(|| format!("cannot write :{target}"))?;
    progress.done();
    Ok((written, format!(":{target}")))
}

async fn download(g: &Global, inner: &str, local: &Path) -> Result<(u64, String)> {
    let source = absolute(inner)?;
    let mut c = g.connect().await?;
    let (size, mode) = c
        .file_read(&source)
        .await
        .with_context(|| format!("cannot read :{source}"))?;
    if local.as_os_str() == "-" {
        let mut out = tokio::io::stdout();
        let got = receive(&mut c, &source, &mut out, &mut Progress::off()).await?;
        out.flush().await.context("cannot write to stdout")?;
        return Ok((got, "-".into()));
    }
    let into_dir = local.to_string_lossy().ends_with('/')
        || tokio::fs::metadata(local).await.is_ok_and(|m| m.is_dir());
    let target = if into_dir {
        local.join(file_name(&source)?)
    } else {
        local.to_path_buf()
    };
    // Into a temporary file beside the target, renamed over it at the
    // end: a copy cut short leaves what was there.
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            tempfile::Builder::new()
                .prefix(".hull-cp-")
                .tempfile_in(dir)
        }
    })
    .await?
    .with_context(|| format!("cannot write in {}", dir.display()))?;
    let (file, temp_path) = temp.into_parts();
    let mut out = tokio::fs::File::from_std(file);
    let mut progress = Progress::new(g, Some(size));
    let got = receive(&mut c, &source, &mut out, &mut progress).await?;
    out.flush()
        .await
        .with_context(|| format!("cannot write {}", target.display()))?;
    out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o777))
        .await
        .with_context(|| format!("cannot set the mode of {}", target.display()))?;
    let shown = target.display().to_string();
    tokio::task::spawn_blocking(move || temp_path.persist(&target))
        .await?
        .with_context(|| format!("cannot write {shown}"))?;
    progress.done();
    Ok((got, shown))
}

/// Writes the file's bytes as they come; their count.
async fn receive(
    c: &mut Client,
    source: &str,
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    progress: &mut Progress,
) -> Result<u64> {
    let mut got = 0u64;
    while let Some(data) = c
        .file_read_next()
        .await
        .with_context(|| format!("cannot read :{source}"))?
    {
        out.write_all(&data)
            .await
            .context("cannot write the copy")?;
        got += data.len() as u64;
        progress.show(got);
    }
    Ok(got)
}

/// A progress line on stderr for a large copy to or from a terminal's
/// user: redrawn at most every 100 ms, never under --json.
struct Progress {
    total: Option<u64>,
    shown_at: Option<Instant>,
    on: bool,
}

impl Progress {
    fn new(g: &Global, total: Option<u64>) -> Progress {
        let on =
            !g.json && std::io::stderr().is_terminal() && total.is_none_or(|t| t >= PROGRESS_FROM);
        Progress {
            total,
            shown_at: None,
            on,
        }
    }

    fn off() -> Progress {
        Progress {
            total: None,
            shown_at: None,
            on: false,
        }
    }

    fn show(&mut self, done: u64) {
        if !self.on
            || self
                .shown_at
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.shown_at = Some(Instant::now());
        let line = match self.total {
            Some(total) if total > 0 => format!(
                "{} of {} ({}%)",
                human(done),
                human(total),
                done.saturating_mul(100) / total
            ),
            _ => human(done),
        };
        let mut err = std::io::stderr();
        let _ = write!(err, "\r\x1b[K{line}");
        let _ = err.flush();
    }

    fn done(&mut self) {
        if self.on && self.shown_at.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

/// `1.5 MiB`, `300 B`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_colon_marks_the_inner_side() {
        assert_eq!(Place::parse(":/tmp/a"), Place::Inner("/tmp/a".into()));
        assert_eq!(Place::parse("./a:b"), Place::Local("./a:b".into()));
        assert_eq!(absolute("etc/os-release").unwrap(), "/etc/os-release");
        assert!(absolute("").is_err());
        assert_eq!(file_name("/etc/os-release").unwrap(), "os-release");
        assert_eq!(file_name("dir/sub/").unwrap(), "sub");
        assert!(file_name("/").is_err() && file_name("..").is_err());
        assert_eq!(human(300), "300 B");
        assert_eq!(human(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
