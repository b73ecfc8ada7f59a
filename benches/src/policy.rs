//! Policy decision throughput: network decisions per second on one core
//! against a 1,000-rule policy, with and without host-name normalisation.
//! Target: at least 1,000,000 decisions per second.
//!
//! Also file decisions (the virtio-fs device asks one for every name the
//! guest looks up) against a mount with the preset's secret-file globs.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use clap::Parser;
use sbx_policy::{Access, NetHost, Policy, PolicyBuilder};

#[derive(Parser)]
#[command(about = "Network policy decisions per second against a generated policy")]
struct Args {
    /// Rules in the generated policy.
    #[arg(long, default_value_t = 1000)]
    rules: usize,
    /// Decisions per measurement.
    #[arg(long, default_value_t = 2_000_000)]
    decisions: usize,
    /// Measurements; the table shows the median and the best.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// A policy shaped like a large organisation's: mostly exact hosts, some
/// one-label and any-depth wildcards, some networks, a tenth of them denies.
fn generate(rules: usize) -> String {
    let mut s = String::from("version = 1\n");
    for i in 0..rules {
        let action = if i % 10 == 0 { "deny" } else { "allow" };
        let to = match i % 20 {
            0..=13 => format!("\"svc{i}.corp{}.example\"", i % 37),
            14 | 15 => format!("\"*.team{i}.example\""),
            16 | 17 => format!("\"**.zone{i}.example\""),
            18 => format!("\"10.{}.{}.0/24\"", i % 256, (i / 256) % 256),
            _ => format!("\"2001:db8:{:x}::/48\"", i),
        };
        let ports = if i % 3 == 0 {
            "\nports = [443, \"8000-8100\"]"
        } else {
            ""
        };
        s.push_str(&format!("\n[[network]]\nid = \"r{i}\"\naction = \"{action}\"\nto = [{to}]{ports}\nreason = \"generated\"\n"));
    }
    s
}

/// Requests: hits on every kind of rule, near misses, and addresses.
fn requests(rules: usize) -> Vec<(String, u16)> {
    let mut v = Vec::new();
    for i in 0..rules {
        let host = match i % 20 {
            0..=13 => format!("svc{i}.corp{}.example", i % 37),
            14 | 15 => format!("api.team{i}.example"),
            16 | 17 => format!("a.b.zone{i}.example"),
            18 => format!("10.{}.{}.7", i % 256, (i / 256) % 256),
            _ => format!("[2001:db8:{:x}::9]", i),
        };
        v.push((host, 443));
        v.push((format!("miss{i}.nowhere.example"), 443));
        v.push((format!("SVC{i}.Corp{}.Example.", i % 37), 8050));
    }
    v
}

/// A project mount and a few deny rules of its own, on top of the preset.
const FS_POLICY: &str = r#"version = 1

[[mount]]
id = "workspace"
host = "/src/proj"
guest = "/workspace"
mode = "rw"

[[fs]]
id = "vendor-ro"
action = "deny"
access = "write"
paths = ["vendor/**", "third_party/**"]

[[fs]]
id = "no-dumps"
action = "deny"
paths = ["**/*.sql", "/workspace/secrets/**"]
"#;

/// Paths of a source tree, a few of them secret.
fn fs_paths() -> Vec<String> {
    let mut v = Vec::new();
    for d in 0..50 {
        for f in 0..20 {
            v.push(format!("/workspace/src/mod{d}/sub/file{f}.rs"));
        }
        v.push(format!("/workspace/pkg{d}/.env"));
        v.push(format!("/workspace/vendor/lib{d}/x.c"));
    }
    v
}

fn rate(n: usize, secs: f64) -> f64 {
    n as f64 / secs
}

fn measure(rounds: usize, decisions: usize, mut f: impl FnMut(usize) -> bool) -> (f64, f64, usize) {
    let mut rates = Vec::new();
    let mut allowed = 0;
    for _ in 0..rounds {
        allowed = 0;
        let t = Instant::now();
        for i in 0..decisions {
            allowed += usize::from(f(i));
        }
        rates.push(rate(decisions, t.elapsed().as_secs_f64()));
    }
    rates.sort_by(f64::total_cmp);
    (rates[rates.len() / 2], rates[rates.len() - 1], allowed)
}

fn pin_to_one_core() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pin_to_one_core();
    let text = generate(args.rules);
    let t = Instant::now();
    let mut b = PolicyBuilder::new();
    b.add_text("generated.toml", &text)?;
    let policy: Policy = b.build()?;
    let compile_ms = t.elapsed().as_secs_f64() * 1000.0;
    let reqs = requests(args.rules);
    let normalised: Vec<(NetHost, u16)> = reqs
        .iter()
        .map(|(h, p)| {
            (
                sbx_policy::normalize_host(h).expect("valid generated host"),
                *p,
            )
        })
        .collect();
    let resolved: IpAddr = "93.184.216.34".parse()?;

    let (p50_pre, best_pre, allowed_pre) = measure(args.rounds, args.decisions, |i| {
        let (h, p) = &normalised[i % normalised.len()];
        black_box(policy.decide_net(black_box(h), None, *p)).allowed()
    });
    let (p50_norm, best_norm, allowed_norm) = measure(args.rounds, args.decisions, |i| {
        let (h, p) = &reqs[i % reqs.len()];
        let host = sbx_policy::normalize_host(black_box(h)).expect("valid");
        black_box(policy.decide_net(&host, None, *p)).allowed()
    });
    let (p50_res, best_res, _) = measure(args.rounds, args.decisions, |i| {
        let (h, p) = &normalised[i % normalised.len()];
        black_box(policy.decide_net(h, Some(resolved), *p)).allowed()
    });
    assert_eq!(allowed_pre, allowed_norm, "normalising changed decisions");

    let mut b = PolicyBuilder::new();
    b.add_text("fs.toml", FS_POLICY)?;
    let fs_policy = b.build()?;
    let paths = fs_paths();
    let (p50_fs, best_fs, allowed_fs) = measure(args.rounds, args.decisions / 4, |i| {
        let access = if i % 2 == 0 {
            Access::Read
        } else {
            Access::Write
        };
        black_box(fs_policy.decide_fs(black_box(&paths[i % paths.len()]), access)).allowed()
    });

    println!(
        "policy: {} generated network rules ({} with the preset), compiled in {compile_ms:.1} ms; {} distinct requests, {:.0}% allowed",
        args.rules,
        policy.rules().len(),
        reqs.len(),
        100.0 * allowed_pre as f64 / args.decisions as f64
    );
    println!(
        "one core, {} decisions x {} rounds\n",
        args.decisions, args.rounds
    );
    println!(
        "{:<44} {:>14} {:>14}",
        "decisions per second", "median", "best"
    );
    for (name, p50, best) in [
        ("decide (host already normalised)", p50_pre, best_pre),
        ("normalise host string + decide", p50_norm, best_norm),
        ("decide with resolved address", p50_res, best_res),
        ("file: decide a guest path", p50_fs, best_fs),
    ] {
        println!("{name:<44} {:>14.0} {:>14.0}", p50, best);
    }
    println!(
        "\nfile decisions: {} paths, {:.0}% allowed",
        paths.len(),
        100.0 * allowed_fs as f64 / (args.decisions / 4) as f64
    );
    println!(
        "\ntarget: 1000000 per second; median {}",
        if p50_norm >= 1e6 {
            "meets it (with normalisation)"
        } else if p50_pre >= 1e6 {
            "meets it without normalisation only"
        } else {
            "MISSES it"
        }
    );
    Ok(())
}
