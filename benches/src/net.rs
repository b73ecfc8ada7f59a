//! Egress benchmark. Two parts:
//!
//! - the proxy alone, driven from the host's loopback: connection setup
//!   (connect, CONNECT, the 200, one byte echoed) through the proxy against
//!   the same without it, and 1 GiB through an allowed tunnel. The target is
//!   an IP literal, so no name is resolved: what is added is the proxy's own
//!   work, policy check included.
//! - with `--guest`, a real guest: curl in the guest fetching from a host
//!   HTTP server through the relay and the proxy, against curl on the host
//!   fetching directly.
//!
//! Run it with `cargo xtask bench net`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use images::Images;
use sbx_egress::{Options, Proxy, Recorder};
use sbx_policy::{Decision, PolicyBuilder, Surface};

mod images;
#[allow(dead_code)] // shared with the other benchmarks
mod stats;

#[derive(Parser)]
#[command(about = "Egress proxy: connection setup and throughput, direct against proxied")]
struct Args {
    /// Connections timed for setup latency.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// MiB sent through the tunnel.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Also measure a real guest (needs --sbx, --kernel, --initrd).
    #[arg(long)]
    guest: bool,
    /// MiB a guest fetches.
    #[arg(long, default_value_t = 1024)]
    guest_mib: u64,
    /// The sbx binary (with --guest).
    #[arg(long, requires_all = ["kernel", "initrd"])]
    sbx: Option<PathBuf>,
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
}

/// Decisions are counted, not logged: the audit log is not what is measured.
struct Count;

impl Recorder for Count {
    fn decision(&self, _: Surface, _: &str, _: &str, d: &Decision<'_>) -> bool {
        d.allowed()
    }
}

fn spawn_echo() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let _ = c.set_nodelay(true);
            std::thread::spawn(move || {
                let mut w = c.try_clone().expect("clone");
                let _ = std::io::copy(&mut &c, &mut w);
            });
        }
    });
    Ok(addr)
}

fn spawn_sink() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let n = std::io::copy(&mut c, &mut std::io::sink()).unwrap_or(0);
                let _ = c.write_all(&n.to_le_bytes());
            });
        }
    });
    Ok(addr)
}

/// An HTTP server: `/N` answers N bytes of zeros.
fn spawn_http(bind: &str) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(bind).with_context(|| format!("cannot listen on {bind}"))?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().expect("clone"));
                let mut first = String::new();
                let _ = r.read_line(&mut first);
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                        break;
                    }
                }
                let n: u64 = first
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.rsplit('/').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let mut w = c;
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                );
                let _ = std::io::copy(&mut std::io::repeat(0).take(n), &mut w);
            });
        }
    });
    Ok(addr)
}

fn start_proxy(allow: &str) -> anyhow::Result<SocketAddr> {
    let mut b = PolicyBuilder::new();
    b.add_text(
        "bench.toml",
        &format!("version = 1\n[[network]]\naction = \"allow\"\nto = [\"{allow}\"]\n"),
    )?;
    let proxy = Proxy::new(Arc::new(b.build()?), Arc::new(Count), Options::new("bench"))?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || proxy.serve_tcp(l));
    Ok(addr)
}

fn tunnel(proxy: SocketAddr, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_nodelay(true)?;
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")?;
    // "HTTP/1.1 200 Connection established\r\n\r\n" is 39 bytes.
    let mut head = [0u8; 39];
    s.read_exact(&mut head)?;
    if !head.starts_with(b"HTTP/1.1 200") {
        bail!("the proxy refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(s)
}

fn ping(mut s: TcpStream) -> anyhow::Result<()> {
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

fn setup_latency(args: &Args, proxy: SocketAddr, echo: SocketAddr) -> anyhow::Result<()> {
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    for _ in 0..args.connections {
        let t = Instant::now();
        let s = TcpStream::connect(echo)?;
        s.set_nodelay(true)?;
        ping(s)?;
        direct.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        ping(tunnel(proxy, echo)?)?;
        via.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("connection setup, {} connections (ms)", args.connections);
    println!("| path | p50 | p90 | p99 |\n| --- | --- | --- | --- |");
    for (name, v) in [("direct", &direct), ("through the proxy", &via)] {
        println!(
            "| {name} | {} | {} | {} |",
            stats::cell(v, 50.0),
            stats::cell(v, 90.0),
            stats::cell(v, 99.0)
        );
    }
    let added = stats::percentile(&via, 50.0).unwrap_or(0.0)
        - stats::percentile(&direct, 50.0).unwrap_or(0.0);
    println!("added per connection (p50): {added:.3} ms (target: under 1 ms)\n");
    Ok(())
}

fn send(mut s: TcpStream, mib: u64) -> anyhow::Result<f64> {
    let block = vec![0u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        s.write_all(&block)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let secs = t.elapsed().as_secs_f64();
    if u64::from_le_bytes(n) != mib << 20 {
        bail!(
            "the sink got {} bytes, not {}",
            u64::from_le_bytes(n),
            mib << 20
        );
    }
    Ok(secs)
}

fn throughput(args: &Args, proxy: SocketAddr, sink: SocketAddr) -> anyhow::Result<()> {
    let direct = send(TcpStream::connect(sink)?, args.mib)?;
    let via = send(tunnel(proxy, sink)?, args.mib)?;
    let mb = (args.mib << 20) as f64 / 1e6;
    println!("{} MiB through one tunnel", args.mib);
    println!("| path | seconds | MB/s |\n| --- | --- | --- |");
    println!("| direct | {direct:.2} | {:.0} |", mb / direct);
    println!("| through the proxy | {via:.2} | {:.0} |", mb / via);
    println!("(target through the proxy: at least 1000 MB/s)\n");
    Ok(())
}

fn guest(args: &Args, images: &Images) -> anyhow::Result<()> {
    let http = spawn_http("127.0.0.2:8080")?;
    let state = tempfile_dir()?;
    std::fs::write(
        state.join("policy.toml"),
        "version = 1\n[[exec]]\naction = \"allow\"\ncommands = [\"**\"]\n[[network]]\naction = \"allow\"\nto = [\"127.0.0.2:8080\"]\n",
    )?;
    let sbx = |a: &[&str]| {
        let mut c = Command::new(&images.sbx);
        c.args(a)
            .env("SBX_RUNTIME_DIR", state.join("run"))
            .env("SBX_STATE_DIR", state.join("state"))
            .env("SBX_CONFIG_DIR", state.join("config"));
        c
    };
    let policy = state.join("policy.toml");
    let out = sbx(&["start", "--name", "netb", "--no-workspace", "--mem", "512"])
        .arg("--policy")
        .arg(&policy)
        .args(images.boot_args())
        .output()?;
    if !out.status.success() {
        bail!("sbx start failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let curl = |on_guest: bool, path: &str, repeat: usize| -> anyhow::Result<Vec<(f64, f64)>> {
        let fmt = "%{speed_download} %{time_starttransfer}\\n";
        let script = format!(
            "for i in $(seq {repeat}); do curl -sS -o /dev/null -w '{fmt}' http://{http}/{path}; done"
        );
        let out = if on_guest {
            sbx(&["exec", "netb", "--", "sh", "-c", &script]).output()?
        } else {
            Command::new("sh")
                .args(["-c", &script.replace("curl ", "curl --noproxy '*' ")])
                .output()?
        };
        if !out.status.success() {
            bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace().map(|x| x.parse::<f64>().ok());
                Some((w.next()??, w.next()??))
            })
            .collect())
    };
    let bytes = (args.guest_mib << 20).to_string();
    let small_host = curl(false, "2", 20)?;
    let small_guest = curl(true, "2", 20)?;
    let big_host = curl(false, &bytes, 1)?;
    let big_guest = curl(true, &bytes, 1)?;
    let _ = sbx(&["rm", "--force", "netb"]).output();
    let ms = |v: &[(f64, f64)]| v.iter().map(|x| x.1 * 1e3).collect::<Vec<_>>();
    println!(
        "a real guest: curl to a host HTTP server, {} MiB and 20 tiny requests",
        args.guest_mib
    );
    println!("| path | MB/s | first byte p50 (ms) | p90 |\n| --- | --- | --- | --- |");
    for (name, big, small) in [
        ("host, direct", &big_host, &small_host),
        ("guest, through relay and proxy", &big_guest, &small_guest),
    ] {
        println!(
            "| {name} | {:.0} | {} | {} |",
            big.first().map_or(0.0, |b| b.0 / 1e6),
            stats::cell(&ms(small), 50.0),
            stats::cell(&ms(small), 90.0)
        );
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("sbx-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let echo = spawn_echo()?;
    let sink = spawn_sink()?;
    let proxy = start_proxy("127.0.0.1")?;
    setup_latency(&args, proxy, echo)?;
    throughput(&args, proxy, sink)?;
    if args.guest {
        let (Some(sbx), Some(kernel), Some(initrd)) =
            (args.sbx.clone(), args.kernel.clone(), args.initrd.clone())
        else {
            bail!("--guest needs --sbx, --kernel and --initrd");
        };
        guest(
            &args,
            &Images {
                sbx,
                kernel,
                initrd,
            },
        )?;
    }
    Ok(())
}
