//! Images benchmark: how long a session takes to be ready (`sbx start`
//! returning) from the base image against the built-in initramfs, side
//! by side in one host, and how long importing (converting) the base
//! image takes. Run it with `cargo xtask bench images`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::bail;
use clap::Parser;
use images::Images;

mod images;
#[allow(dead_code)] // shared with the other benchmarks, which use all of it
mod stats;

#[derive(Parser)]
#[command(about = "Time to agent-ready from an image against the initramfs; image conversion")]
struct Args {
    /// Starts of each kind, alternating.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The image sessions boot from (in $SBX_CACHE_DIR's store).
    #[arg(long, default_value = "base")]
    image: String,
    /// The base image archive `cargo xtask image base` wrote, to time its import.
    #[arg(long)]
    archive: Option<PathBuf>,
    #[command(flatten)]
    images: Images,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = std::env::temp_dir().join(format!("sbx-bench-images-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let sbx = |a: &[&str]| {
        let mut c = Command::new(&args.images.sbx);
        c.args(a)
            .env("SBX_RUNTIME_DIR", base.join("run"))
            .env("SBX_STATE_DIR", base.join("state"))
            .current_dir(&base);
        c
    };
    let ready = |image: Option<&str>| -> anyhow::Result<f64> {
        let mut c = sbx(&["start", "--name", "img", "--no-workspace"]);
        if let Some(i) = image {
            c.args(["--image", i]);
        }
        c.args(args.images.boot_args());
        let t = Instant::now();
        let out = c.output()?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("sbx start failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        sbx(&["rm", "--force", "img"]).output()?;
        Ok(secs)
    };
    println!("# sbx images benchmark: `sbx start` until the guest agent is ready");
    let (mut initramfs, mut image) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        initramfs.push(ready(None)?);
        image.push(ready(Some(&args.image))?);
    }
    let p50 = |v: &[f64]| stats::percentile(v, 50.0).unwrap_or(0.0);
    println!("{:<40} {:>10} {:>10}", "start to ready", "p50 s", "ratio");
    println!(
        "{:<40} {:>10.2} {:>9.2}x",
        "initramfs (busybox, git, curl)",
        p50(&initramfs),
        1.0
    );
    println!(
        "{:<40} {:>10.2} {:>9.2}x",
        format!("image {} (disk + overlay root)", args.image),
        p50(&image),
        p50(&image) / p50(&initramfs).max(1e-6)
    );
    if let Some(archive) = &args.archive {
        let store = base.join("store");
        let t = Instant::now();
        let out = sbx(&["image", "import"])
            .arg(archive)
            .env("SBX_CACHE_DIR", &store)
            .output()?;
        if !out.status.success() {
            bail!(
                "sbx image import failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mib = std::fs::metadata(archive)?.len() as f64 / (1 << 20) as f64;
        println!(
            "# import and convert {} ({mib:.0} MiB archive): {:.1} s",
            archive.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
