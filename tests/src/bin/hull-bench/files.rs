//! Files: a large file written and read back through the HTTP API's files
//! routes, against `cat` through `hull exec` (stdin to a file, the file to
//! stdout), in the same run on the same volume.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hull_tests::{block_on, Limits, TestHull};

use crate::report::{print_table, Row};

/// Bytes per write call on either side: what a client streams with.
const CHUNK: usize = 1 << 20;

pub fn run(mib: u64, rounds: usize) -> Result<()> {
    let hull = TestHull::start_with(Limits {
        memory_max: "2G",
        volume_size: "8G",
        ..Limits::default()
    });
    let addr = block_on(hull.api_addr());
    let token = hull.api_token("exec");
    let name = sprite_name(addr, &token)?;
    let size = mib << 20;
    let chunk: Vec<u8> = (0..CHUNK)
        .map(|i| (i * 7 + i / 4096).to_le_bytes()[0])
        .collect();
    block_on(hull.sh("mkdir -p /bench"));

    // Seconds per round: [API write, API read, exec write, exec read].
    let mut times: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        let t = Instant::now();
        api_write(addr, &name, &token, "/bench/api.bin", size, &chunk)?;
        times[0].push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        check_size(
            "API",
            api_read(addr, &name, &token, "/bench/api.bin")?,
            size,
        )?;
        times[1].push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        exec_write(&hull, "/bench/exec.bin", size, &chunk)?;
        times[2].push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        check_size("exec cat", exec_read(&hull, "/bench/exec.bin")?, size)?;
        times[3].push(t.elapsed().as_secs_f64());
        block_on(hull.sh("rm -f /bench/api.bin /bench/exec.bin"));
    }
    let both = |w: &[f64], r: &[f64]| w.iter().zip(r).map(|(w, r)| w + r).collect::<Vec<_>>();
    let api = Row::new("API write + read", both(&times[0], &times[1]), "s")
        .target("vs exec: >= 1.5x faster");
    let exec = Row::new("exec cat write + read", both(&times[2], &times[3]), "s");
    let [api_w, api_r, exec_w, exec_r] = times;
    let parts = [
        Row::new("  API write", api_w, "s"),
        Row::new("  API read", api_r, "s"),
        Row::new("  exec cat write", exec_w, "s"),
        Row::new("  exec cat read", exec_r, "s"),
    ];
    println!();
    println!("files: {mib} MiB written and read back, {rounds} rounds");
    print_table(&[&api, &exec, &parts[0], &parts[1], &parts[2], &parts[3]]);
    let mb = (2 * size) as f64 / 1e6;
    println!(
        "throughput p50: API {:.0} MB/s, exec cat {:.0} MB/s; API is {:.2}x exec (target >= 1.5x)",
        mb / api.p50(),
        mb / exec.p50(),
        exec.p50() / api.p50()
    );
    Ok(())
}

/// `size` bytes of `chunk` over and over.
fn send(out: &mut impl Write, size: u64, chunk: &[u8]) -> std::io::Result<()> {
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left).map_or(chunk.len(), |l| l.min(chunk.len()));
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn check_size(what: &str, read: u64, size: u64) -> Result<()> {
    if read != size {
        bail!("{what} read back {read} bytes of {size}");
    }
    Ok(())
}

fn sprite_name(addr: SocketAddr, token: &str) -> Result<String> {
    let r = hull_tests::http::request(addr, "GET", "/v1/sprites", Some(token), None);
    r.json()["sprites"][0]["name"]
        .as_str()
        .map(str::to_string)
        .context("GET /v1/sprites named no sprite")
}

fn api_write(
    addr: SocketAddr,
    name: &str,
    token: &str,
    path: &str,
    size: u64,
    chunk: &[u8],
) -> Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    write!(
        stream,
        "PUT /v1/sprites/{name}/fs/write?path={path} HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )?;
    send(&mut stream, size, chunk)?;
    let (status, _) = read_head(&mut BufReader::new(stream))?;
    if status != 200 {
        bail!("PUT {path}: status {status}");
    }
    Ok(())
}

/// GETs `path` and counts its bytes as they come, keeping none.
fn api_read(addr: SocketAddr, name: &str, token: &str, path: &str) -> Result<u64> {
    let mut stream = TcpStream::connect(addr)?;
    write!(
        stream,
        "GET /v1/sprites/{name}/fs/read?path={path} HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = BufReader::with_capacity(CHUNK, stream);
    let (status, length) = read_head(&mut reader)?;
    if status != 200 {
        bail!("GET {path}: status {status}");
    }
    let got = drain(&mut reader)?;
    if length.is_some_and(|l| l != got) {
        bail!("GET {path}: {got} bytes of a Content-Length {length:?}");
    }
    Ok(got)
}

/// The status and Content-Length of a response's head.
fn read_head(reader: &mut impl BufRead) -> Result<(u16, Option<u64>)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut length = None;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            return Ok((status, length));
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok();
            }
        }
    }
}

fn drain(reader: &mut impl Read) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        match reader.read(&mut buf)? {
            0 => return Ok(got),
            n => got += n as u64,
        }
    }
}

/// `hull exec` without its exec log (which would hash the output): the
/// transport alone, as the API's routes are.
fn hull_exec(hull: &TestHull, script: &str) -> Command {
    let mut command = hull.hull_command();
    command.args(["exec", "-i", "--no-log", "--", "sh", "-c", script]);
    command
}

fn exec_write(hull: &TestHull, path: &str, size: u64, chunk: &[u8]) -> Result<()> {
    let mut child = hull_exec(hull, &format!("cat > {path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    send(&mut stdin, size, chunk)?;
    drop(stdin);
    let status = child.wait()?;
    if !status.success() {
        bail!("hull exec cat > {path}: {status}");
    }
    Ok(())
}

fn exec_read(hull: &TestHull, path: &str) -> Result<u64> {
    let mut child = hull_exec(hull, &format!("cat {path}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let got = drain(&mut child.stdout.take().context("no stdout")?)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("hull exec cat {path}: {status}");
    }
    Ok(got)
}
