//! `hull cp`: files and directories between this machine and the inner, over hulld's
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

/// Directory levels a recursive copy descends.
const MAX_DEPTH: usize = 256;

/// What `--json` prints.
#[derive(serde::Serialize)]
struct Copied {
    source: String,
    destination: String,
    /// Regular files copied.
    files: u64,
    bytes: u64,
    /// Symlinks copied as symlinks (their target text, never followed).
    symlinks: u64,
    /// Devices, FIFOs and sockets left out of a recursive copy, and
    /// symlinks whose target is not UTF-8.
    skipped: Vec<String>,
}

/// What a copy has done so far.
#[derive(Default)]
struct Tally {
    files: u64,
    bytes: u64,
    symlinks: u64,
    skipped: Vec<String>,
}

/// `hull cp [-r] SRC DST`.
pub async fn cp(g: &Global, src: &str, dst: &str, recursive: bool) -> Result<()> {
    let (from, to) = (Place::parse(src), Place::parse(dst));
    let mut tally = Tally::default();
    let destination = match (&from, &to) {
        (Place::Local(local), Place::Inner(inner)) => {
            upload(g, local, inner, recursive, &mut tally).await?
        }
        (Place::Inner(inner), Place::Local(local)) => {
            download(g, inner, local, recursive, &mut tally).await?
        }
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
        files: tally.files,
        bytes: tally.bytes,
        symlinks: tally.symlinks,
        skipped: tally.skipped,
    };
    if g.json {
        return print_json(&copied);
    }
    for path in &copied.skipped {
        errln!("hull: left out {path}: hull cp copies directories, regular files and symlinks (with UTF-8 targets) only");
    }
    if !matches!(to, Place::Local(ref p) if p.as_os_str() == "-") {
        let count = if recursive && copied.symlinks > 0 {
            format!("{} files, {} symlinks, ", copied.files, copied.symlinks)
        } else if recursive {
            format!("{} files, ", copied.files)
        } else {
            String::new()
        };
        outln!(
            "copied {} to {} ({count}{})",
            copied.source,
            copied.destination,
            human(copied.bytes)
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

/// `dir/name` in the inner.
fn inner_join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

async fn upload(
    g: &Global,
    local: &Path,
    inner: &str,
    recursive: bool,
    tally: &mut Tally,
) -> Result<String> {
    let mut target = absolute(inner)?;
    let mut c = g.connect().await?;
    let stdin = local.as_os_str() == "-";
    let meta = if stdin {
        None
    } else {
        let meta = tokio::fs::metadata(local)
            .await
            .with_context(|| format!("cannot read {}", local.display()))?;
        if meta.is_dir() && !recursive {
            bail!(
                "{} is a directory: add -r to copy it and all in it",
                local.display()
            );
        }
        Some(meta)
    };
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
        target = inner_join(&target, file_name(&local.to_string_lossy())?);
    }
    let mut progress = Progress::new(g, meta.as_ref().filter(|m| m.is_file()).map(|m| m.len()));
    match meta {
        Some(meta) if meta.is_dir() => {
            upload_tree(&mut c, local, &target, 0, tally, &mut progress).await?;
        }
        Some(meta) => {
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
            let file = tokio::fs::File::open(local)
                .await
                .with_context(|| format!("cannot open {}", local.display()))?;
            upload_file(
                &mut c,
                Box::new(file),
                local,
                &target,
                mode,
                tally,
                &mut progress,
            )
            .await?;
        }
        None => {
            let input = Box::new(tokio::io::stdin());
            upload_file(&mut c, input, local, &target, 0o644, tally, &mut progress).await?;
        }
    }
    progress.done();
    Ok(format!(":{target}"))
}

/// The local directory `local` and all in it as the inner's `target`.
fn upload_tree<'a>(
    c: &'a mut Client,
    local: &'a Path,
    target: &'a str,
    depth: usize,
    tally: &'a mut Tally,
    progress: &'a mut Progress,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
    Box::pin(async move {
        if depth >= MAX_DEPTH {
            bail!(
                "{} is more than {MAX_DEPTH} directories deep",
                local.display()
            );
        }
        let meta = tokio::fs::metadata(local)
            .await
            .with_context(|| format!("cannot read {}", local.display()))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        c.file_make_dir(target, mode)
            .await
            .with_context(|| format!("cannot make :{target}"))?;
        let mut names = Vec::new();
        let mut dir = tokio::fs::read_dir(local)
            .await
            .with_context(|| format!("cannot read {}", local.display()))?;
        while let Some(entry) = dir
            .next_entry()
            .await
            .with_context(|| format!("cannot read {}", local.display()))?
        {
            names.push(entry.file_name());
        }
        names.sort();
        for name in names {
            let path = local.join(&name);
            let inner = inner_join(target, &name.to_string_lossy());
            let meta = tokio::fs::symlink_metadata(&path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))?;
            if meta.is_dir() {
                upload_tree(c, &path, &inner, depth + 1, tally, progress).await?;
            } else if meta.is_file() {
                let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
                let file = tokio::fs::File::open(&path)
                    .await
                    .with_context(|| format!("cannot open {}", path.display()))?;
                upload_file(c, Box::new(file), &path, &inner, mode, tally, progress).await?;
            } else if meta.is_symlink() {
                // Its target as text: read, never followed.
                let target = tokio::fs::read_link(&path)
                    .await
                    .with_context(|| format!("cannot read the symlink {}", path.display()))?;
                let Some(target) = target.to_str() else {
                    tally.skipped.push(path.display().to_string());
                    continue;
                };
                c.file_symlink(&inner, target)
                    .await
                    .with_context(|| format!("cannot make the symlink :{inner}"))?;
                tally.symlinks += 1;
            } else {
                tally.skipped.push(path.display().to_string());
            }
        }
        Ok(())
    })
}

async fn upload_file(
    c: &mut Client,
    mut input: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    local: &Path,
    target: &str,
    mode: u32,
    tally: &mut Tally,
    progress: &mut Progress,
) -> Result<()> {
    c.file_write(target, mode, false)
        .await
        .with_context(|| format!("cannot write :{target}"))?;
    let mut buf = vec![0u8; LOCAL_CHUNK];
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
        tally.bytes += n as u64;
        progress.show(tally.bytes);
    }
    c.file_write_end()
        .await
        .with_context(|| format!("cannot write :{target}"))?;
    tally.files += 1;
    Ok(())
}

async fn download(
    g: &Global,
    inner: &str,
    local: &Path,
    recursive: bool,
    tally: &mut Tally,
) -> Result<String> {
    let source = absolute(inner)?;
    let mut c = g.connect().await?;
    let entry = c
        .file_stat(&source)
        .await
        .with_context(|| format!("cannot read :{source}"))?;
    let is_dir = entry.kind == FileKind::Directory;
    if is_dir && !recursive {
        bail!(":{source} is a directory: add -r to copy it and all in it");
    }
    if local.as_os_str() == "-" {
        if is_dir {
            bail!(":{source} is a directory: it cannot go to stdout");
        }
        c.file_read(&source)
            .await
            .with_context(|| format!("cannot read :{source}"))?;
        let mut out = tokio::io::stdout();
        tally.bytes = receive(&mut c, &source, &mut out, &mut Progress::off(), 0).await?;
        tally.files = 1;
        out.flush().await.context("cannot write to stdout")?;
        return Ok("-".into());
    }
    let into_dir = local.to_string_lossy().ends_with('/')
        || tokio::fs::metadata(local).await.is_ok_and(|m| m.is_dir());
    let target = if into_dir {
        local.join(file_name(&source)?)
    } else {
        local.to_path_buf()
    };
    let mut progress = Progress::new(g, (!is_dir).then_some(entry.size));
    if is_dir {
        download_tree(
            &mut c,
            &source,
            &target,
            entry.mode,
            0,
            tally,
            &mut progress,
        )
        .await?;
    } else {
        download_file(&mut c, &source, &target, tally, &mut progress).await?;
    }
    progress.done();
    Ok(target.display().to_string())
}

/// The inner's directory `source` and all in it as the local `target`.
fn download_tree<'a>(
    c: &'a mut Client,
    source: &'a str,
    target: &'a Path,
    mode: u32,
    depth: usize,
    tally: &'a mut Tally,
    progress: &'a mut Progress,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
    Box::pin(async move {
        if depth >= MAX_DEPTH {
            bail!(":{source} is more than {MAX_DEPTH} directories deep");
        }
        match tokio::fs::create_dir(target).await {
            Ok(()) => {
                tokio::fs::set_permissions(
                    target,
                    std::os::unix::fs::PermissionsExt::from_mode(mode & 0o777),
                )
                .await
                .with_context(|| format!("cannot set the mode of {}", target.display()))?;
            }
            // Into a directory that is there, never through a symlink.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = tokio::fs::symlink_metadata(target)
                    .await
                    .with_context(|| format!("cannot read {}", target.display()))?;
                if !meta.is_dir() {
                    bail!(
                        "{} is in the way of the directory :{source}",
                        target.display()
                    );
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot make {}", target.display())),
        }
        let entries = c
            .file_list(source)
            .await
            .with_context(|| format!("cannot list :{source}"))?;
        for entry in entries {
            let local = target.join(&entry.name);
            match entry.kind {
                FileKind::Directory => {
                    download_tree(
                        c,
                        &entry.path,
                        &local,
                        entry.mode,
                        depth + 1,
                        tally,
                        progress,
                    )
                    .await?;
                }
                FileKind::File => download_file(c, &entry.path, &local, tally, progress).await?,
                FileKind::Symlink => match &entry.target {
                    Some(link) => {
                        download_symlink(link, &local).await?;
                        tally.symlinks += 1;
                    }
                    None => tally.skipped.push(format!(":{}", entry.path)),
                },
                FileKind::Other => tally.skipped.push(format!(":{}", entry.path)),
            }
        }
        Ok(())
    })
}

/// A symlink to `link` (its text, from the inner) as the local `target`:
/// made under a temporary name beside it and renamed over it, so what was
/// there is replaced whole and nothing is followed.
async fn download_symlink(link: &str, target: &Path) -> Result<()> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (link, shown, target) = (
        PathBuf::from(link),
        target.display().to_string(),
        target.to_path_buf(),
    );
    tokio::task::spawn_blocking(move || {
        let temp = tempfile::Builder::new()
            .prefix(".hull-cp-")
            .make_in(&dir, |path| std::os::unix::fs::symlink(&link, path))?
            .into_temp_path();
        temp.persist(&target).map_err(|e| e.error)
    })
    .await?
    .with_context(|| format!("cannot make the symlink {shown}"))
}

/// The inner's regular file `source` as the local `target`: into a
/// temporary file beside it, renamed over it at the end, so a copy cut
/// short leaves what was there.
async fn download_file(
    c: &mut Client,
    source: &str,
    target: &Path,
    tally: &mut Tally,
    progress: &mut Progress,
) -> Result<()> {
    let (_, mode) = c
        .file_read(source)
        .await
        .with_context(|| format!("cannot read :{source}"))?;
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
    let got = receive(c, source, &mut out, progress, tally.bytes).await?;
    out.flush()
        .await
        .with_context(|| format!("cannot write {}", target.display()))?;
    out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o777))
        .await
        .with_context(|| format!("cannot set the mode of {}", target.display()))?;
    let (shown, target) = (target.display().to_string(), target.to_path_buf());
    tokio::task::spawn_blocking(move || temp_path.persist(&target))
        .await?
        .with_context(|| format!("cannot write {shown}"))?;
    tally.bytes += got;
    tally.files += 1;
    Ok(())
}

/// Writes the file's bytes as they come; their count. `before`: the
/// bytes the copy moved before this file, for the progress line.
async fn receive(
    c: &mut Client,
    source: &str,
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    progress: &mut Progress,
    before: u64,
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
        progress.show(before + got);
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
pub(super) fn human(bytes: u64) -> String {
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
