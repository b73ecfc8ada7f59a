//! Shared-directory benchmark: the same workloads on the host's own file
//! system and in an sbx guest through /workspace, with the ratio.
//!
//! - sequential write and read of 1 GiB (`dd`, 1 MiB blocks; the guest's
//!   page cache is dropped before the read);
//! - `find` plus `stat` over a 20,000-file tree (cold: guest caches
//!   dropped first; warm: run again);
//! - creating and deleting 10,000 small files;
//! - `git status` over the same tree, committed (cold and warm);
//! - how long a host edit takes to show in a guest that has the file
//!   cached (an editor's save: write aside, rename over).
//!
//! Both sides run busybox's tools, so only the file system differs. The
//! metadata workloads also run once in the guest's own memory, which shows
//! what the guest itself costs on the machine, apart from the sharing. Guest
//! times are measured on the host around `sbx exec` minus the median cost
//! of `sbx exec -- true`. The metadata workloads run under each cache mode
//! (`--fs-cache`), and under `clone`: the repository cloned onto the
//! session's own disk (`--workspace clone`, from an image), where the
//! target is within 1.5x of host-native. Run it with `cargo xtask bench fs`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use images::Images;

mod images;
#[allow(dead_code)] // shared with the other benchmarks, which use all of it
mod stats;

const BB: &str = "/bin/busybox";
/// Where a clone session (an image without busybox) gets the host's.
const BB_SHARED: &str = "/mnt/hostbin/busybox";
const TREE_DIRS: usize = 200;
const TREE_FILES: usize = 100;

#[derive(Parser)]
#[command(about = "Shared-directory throughput and metadata speed, host against guest")]
struct Args {
    /// MiB written and read sequentially.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Cache modes to measure the metadata workloads under; `clone` is
    /// the clone workspace instead of a shared one.
    #[arg(long, value_delimiter = ',', default_value = "auto,never,always")]
    modes: Vec<String>,
    /// The image clone sessions boot from (a store in $SBX_CACHE_DIR).
    #[arg(long, default_value = "base")]
    image: String,
    #[command(flatten)]
    images: Images,
}

struct Session<'a> {
    args: &'a Args,
    state: PathBuf,
    /// The busybox the guest's scripts run.
    bb: &'static str,
}

impl Session<'_> {
    fn cmd(&self, a: &[&str]) -> Command {
        let mut c = Command::new(&self.args.images.sbx);
        c.args(a)
            .env("SBX_RUNTIME_DIR", self.state.join("run"))
            .env("SBX_STATE_DIR", self.state.join("state"));
        c
    }

    fn start<'a>(
        args: &'a Args,
        state: PathBuf,
        work: &Path,
        mode: &str,
    ) -> anyhow::Result<Session<'a>> {
        let clone = mode == "clone";
        let s = Session {
            args,
            state,
            bb: if clone { BB_SHARED } else { BB },
        };
        let mut cmd = s.cmd(&["start", "--name", "fsb", "--mem", "512"]);
        if clone {
            cmd.args(["--workspace", "clone", "--image", &args.image])
                .args(["--mount", "/bin:/mnt/hostbin:ro"]);
        } else {
            cmd.args(["--fs-cache", mode]);
        }
        let out = cmd
            .args(args.images.boot_args())
            .current_dir(work)
            .output()?;
        if !out.status.success() {
            bail!("sbx start failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(s)
    }

    /// Seconds `script` takes in the guest, less the cost of an exec.
    fn time(&self, script: &str, overhead: f64) -> anyhow::Result<f64> {
        let t = Instant::now();
        let out = self
            .cmd(&["exec", "fsb", "--", "sh", "-c", script])
            .output()?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "guest: `{script}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((secs - overhead).max(0.0))
    }

    fn drop_caches(&self) -> anyhow::Result<()> {
        self.time("sync; echo 3 > /proc/sys/vm/drop_caches", 0.0)
            .map(|_| ())
    }

    /// Seconds from a host save of a file to a guest that polls it every
    /// 10 ms seeing the new text (the median of five), or `None` if it is
    /// not seen within 10 s.
    fn edit_latency(&self, work: &Path) -> anyhow::Result<Option<f64>> {
        let mut v = Vec::new();
        for i in 0..5 {
            let (old, new) = (format!("old{i}"), format!("new{i}"));
            std::fs::write(work.join("edit.txt"), &old)?;
            let script = format!(
                "cat edit.txt >/dev/null; echo ready; n=0; \
                 while [ \"$(cat edit.txt)\" != {new} ]; do sleep 0.01; n=$((n+1)); \
                 [ $n -gt 1000 ] && exit 1; done; echo seen"
            );
            let mut child = self
                .cmd(&["exec", "fsb", "--", "sh", "-c", &script])
                .stdout(Stdio::piped())
                .spawn()?;
            let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
            if lines.next().transpose()?.as_deref() != Some("ready") {
                bail!("the guest's poll loop did not start");
            }
            // Let the guest settle on the old text, cached.
            std::thread::sleep(Duration::from_millis(500));
            std::fs::write(work.join("edit.tmp"), &new)?;
            let t = Instant::now();
            std::fs::rename(work.join("edit.tmp"), work.join("edit.txt"))?;
            let seen = lines.next().transpose()?.as_deref() == Some("seen");
            let secs = t.elapsed().as_secs_f64();
            child.wait()?;
            if !seen {
                return Ok(None);
            }
            v.push(secs);
        }
        std::fs::remove_file(work.join("edit.txt"))?;
        Ok(stats::percentile(&v, 50.0))
    }

    fn exec_overhead(&self) -> anyhow::Result<f64> {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(self.time("true", 0.0)?);
        }
        Ok(stats::percentile(&v, 50.0).unwrap_or(0.0))
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "--force", "fsb"]).output();
    }
}

fn host_time(dir: &Path, script: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = Command::new(BB)
        .args(["sh", "-c", script])
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "host: `{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The tree [`make_tree`] makes, made by a guest shell in its own memory.
fn guest_tree_script(dir: &str) -> String {
    format!(
        "mkdir -p {dir} && cd {dir} && d=0; while [ $d -lt {TREE_DIRS} ]; do mkdir -p tree/d$d; f=0; \
         while [ $f -lt {TREE_FILES} ]; do echo x > tree/d$d/f$f; f=$((f+1)); done; d=$((d+1)); done"
    )
}

fn make_tree(root: &Path) -> anyhow::Result<()> {
    for d in 0..TREE_DIRS {
        let dir = root.join(format!("tree/d{d}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..TREE_FILES {
            std::fs::write(dir.join(format!("f{f}")), b"x")?;
        }
    }
    Ok(())
}

fn write_script(bb: &str, mib: u64) -> String {
    format!("{bb} dd if=/dev/zero of=big bs=1048576 count={mib} 2>/dev/null")
}

fn read_script(bb: &str) -> String {
    format!("{bb} dd if=big of=/dev/null bs=1048576 2>/dev/null")
}

fn find_script(bb: &str) -> String {
    format!("{bb} find tree -type f -exec {bb} stat -c '%s %Y' {{}} + >/dev/null")
}

fn churn_script(bb: &str) -> String {
    format!("mkdir c && cd c && i=0; while [ $i -lt 10000 ]; do echo x > f$i; i=$((i+1)); done; cd .. && {bb} rm -r c")
}

/// Debian's git on both sides (the guest's rootfs carries the same one).
const GIT: &str = "/usr/bin/git";

fn git_script() -> String {
    format!("{GIT} status --porcelain >/dev/null")
}

fn git_commit(dir: &Path) -> anyhow::Result<()> {
    let script = format!(
        "{GIT} init -q && {GIT} add -A && {GIT} -c user.name=bench -c user.email=bench@sbx commit -qm tree"
    );
    host_time(dir, &script).map(|_| ())
}

struct Row {
    what: String,
    host: f64,
    guest: f64,
}

impl Row {
    fn new(what: String, mode: &str, host: f64, guest: f64) -> Row {
        Row {
            what: format!("{what} [{mode}]"),
            host,
            guest,
        }
    }
}

fn print_header() {
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "workload", "host s", "guest s", "ratio"
    );
}

/// Rows are printed as they are measured: a long run still shows what it got.
fn print(r: &Row) {
    println!(
        "{:<44} {:>10.2} {:>10.2} {:>7.2}x",
        r.what,
        r.host,
        r.guest,
        r.guest / r.host.max(1e-6)
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = std::env::temp_dir().join(format!("sbx-bench-fs-{}", std::process::id()));
    let host_dir = base.join("host");
    let work = base.join("work");
    std::fs::create_dir_all(&host_dir)?;
    std::fs::create_dir_all(&work)?;
    make_tree(&host_dir)?;
    make_tree(&work)?;
    let mib = args.mib;
    println!("# sbx shared-directory benchmark: host-native against the guest's /workspace");
    println!("# the same busybox commands on both sides; guest times exclude the exec round trip");

    // Host-native figures.
    let h_write = host_time(&host_dir, &write_script(BB, mib))?;
    let h_read = host_time(&host_dir, &read_script(BB))?;
    std::fs::remove_file(host_dir.join("big"))?;
    let h_find = host_time(&host_dir, &find_script(BB))?;
    let h_find_warm = host_time(&host_dir, &find_script(BB))?;
    let h_churn = host_time(&host_dir, &churn_script(BB))?;
    // A repository over the tree on both sides, committed on the host.
    git_commit(&host_dir)?;
    git_commit(&work)?;
    host_time(&host_dir, &git_script())?;
    let h_git = host_time(&host_dir, &git_script())?;

    let mut rows = Vec::new();
    let mut shown = 0;
    print_header();
    for (i, mode) in args.modes.iter().enumerate() {
        let s = Session::start(&args, base.join(format!("state-{mode}")), &work, mode)
            .with_context(|| format!("cache mode {mode}"))?;
        let overhead = s.exec_overhead()?;
        let bb = s.bb;
        if i == 0 && mode != "clone" {
            let w = s.time(&write_script(bb, mib), overhead)?;
            s.drop_caches()?;
            let r = s.time(&read_script(bb), overhead)?;
            s.time("rm big", overhead)?;
            let rate = |secs: f64| mib as f64 * 1.048576 / secs.max(1e-6);
            println!(
                "# --fs-cache {mode}: write {:.0} MB/s (host {:.0}), read {:.0} MB/s (host {:.0})",
                rate(w),
                rate(h_write),
                rate(r),
                rate(h_read)
            );
            rows.push(Row::new(format!("seq write {mib} MiB"), mode, h_write, w));
            rows.push(Row::new(format!("seq read {mib} MiB"), mode, h_read, r));
            // The same work where the guest keeps its files itself: what the
            // guest costs on this machine, apart from sharing the directory.
            let dir = "/tmp/sbx-bench-local";
            s.time(&guest_tree_script(dir), overhead)?;
            let find = s.time(&format!("cd {dir} && {}", find_script(bb)), overhead)?;
            let churn = s.time(&format!("cd {dir} && {}", churn_script(bb)), overhead)?;
            s.time(&format!("rm -rf {dir}"), overhead)?;
            println!(
                "# in the guest's own memory, no sharing: find+stat {:.2} s, create+delete {:.2} s",
                find, churn
            );
        }
        s.drop_caches()?;
        let cold = s.time(&find_script(bb), overhead)?;
        let warm = s.time(&find_script(bb), overhead)?;
        let churn = s.time(&churn_script(bb), overhead)?;
        // The first status in the guest refreshes the index (the host's
        // inode numbers and devices are not the guest's); then it is the
        // metadata walk an agent repeats all day.
        s.time(&git_script(), overhead)?;
        s.drop_caches()?;
        let git_cold = s.time(&git_script(), overhead)?;
        let git_warm = s.time(&git_script(), overhead)?;
        let n = TREE_DIRS * TREE_FILES;
        for (what, host, guest) in [
            (format!("find+stat {n} files, cold"), h_find, cold),
            (format!("find+stat {n} files, warm"), h_find_warm, warm),
            ("create+delete 10000 files".into(), h_churn, churn),
            (format!("git status, {n} files, cold"), h_git, git_cold),
            (format!("git status, {n} files, warm"), h_git, git_warm),
        ] {
            rows.push(Row::new(what, mode, host, guest));
        }
        for r in &rows[shown..] {
            print(r);
        }
        shown = rows.len();
        println!(
            "# exec round trip subtracted under {mode}: {:.0} ms",
            overhead * 1000.0
        );
        if mode == "clone" {
            println!("# --workspace clone: host edits do not reach the clone; `sbx fetch` brings its commits back");
        } else if mode == "always" {
            println!("# --fs-cache always: host edits are not watched (they show within 60 s)");
        } else {
            match s.edit_latency(&work)? {
                Some(t) => println!(
                    "# --fs-cache {mode}: a host save shows in the guest after {:.0} ms (median of 5)",
                    t * 1000.0
                ),
                None => println!("# --fs-cache {mode}: a host save did not show in the guest within 10 s"),
            }
        }
    }
    println!("# target: metadata-heavy work within 3x of host-native shared, 1.5x in a clone");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
