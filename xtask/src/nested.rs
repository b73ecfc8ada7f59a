//! The nested test host: a first-level VM, run by QEMU in software mode with
//! Debian's own kernel, whose `kvm_amd` gives a real `/dev/kvm` on hosts whose
//! own KVM cannot boot standard guests (kvm_pvm).
//!
//! The VM sees the host's whole filesystem read-only (9p), with a writable
//! per-run scratch directory and any `--rw` directories shared read-write at
//! the same paths, the host's /tmp under a writable in-memory overlay, a fresh
//! tmpfs on /run, and runs the command as
//! root in the same working directory with the same environment. Its stdout,
//! stderr and exit status come back through the scratch directory.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cpio::Archive;
use crate::{deps, paths, proc, rootfs};

/// Modules the nested host's init loads (dependencies come from modules.dep).
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "kvm_amd",
    "virtio_net",
];
/// Exit status when the command did not finish within the timeout (as timeout(1)).
pub const EXIT_TIMEOUT: u8 = 124;
/// Memory of the nested host: room for a few guests at once.
pub const DEFAULT_MEM_MIB: u64 = 2048;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Kill the nested host after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Memory of the nested host in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// Host directory to share read-write at the same path (repeatable).
    #[arg(long, value_name = "DIR")]
    pub rw: Vec<PathBuf>,
    /// Keep the scratch directory (console log, outputs) after the run.
    #[arg(long)]
    pub keep: bool,
    /// Give the nested host a network (QEMU's user-mode NAT), for work
    /// that fetches packages; without it the nested host has only loopback.
    #[arg(long)]
    pub net: bool,
    /// Command to run inside the nested host.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// The unpacked Debian kernel and the initramfs built around it.
struct HostImage {
    vmlinuz: PathBuf,
    initramfs: PathBuf,
}

fn debian_kernel_package() -> anyhow::Result<String> {
    let deps = proc::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains('<'))
        .map(str::to_string)
        .context("apt-cache names no kernel package behind linux-image-amd64; run apt-get update")
}

/// Downloads and unpacks Debian's kernel once, into the cache.
fn unpacked_kernel(cache: &Path) -> anyhow::Result<(PathBuf, String)> {
    let mut pkg = debian_kernel_package();
    if pkg.is_err() {
        proc::run(Command::new("apt-get").args(["update", "-qq"]))?;
        pkg = debian_kernel_package();
    }
    let pkg = pkg?;
    let release = pkg.trim_start_matches("linux-image-").to_string();
    let dir = cache.join("nested").join(&release);
    if dir.join("vmlinuz").is_file() {
        return Ok((dir, release));
    }
    proc::step(&format!("downloading {pkg} for the nested test host"));
    let staging = cache
        .join("nested")
        .join(format!(".{release}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    proc::run(
        Command::new("apt-get")
            .current_dir(&staging)
            .args(["download", "-qq", &pkg]),
    )?;
    let deb = std::fs::read_dir(&staging)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let root = staging.join("root");
    proc::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    proc::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    std::fs::rename(
        root.join(format!("boot/vmlinuz-{release}")),
        staging.join("vmlinuz"),
    )?;
    std::fs::rename(
        root.join(format!("lib/modules/{release}")),
        staging.join("modules"),
    )?;
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&deb);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)?;
    Ok((dir, release))
}

/// `name` and everything it depends on, as paths relative to the modules dir.
fn module_closure(modules_dep: &str, names: &[&str]) -> anyhow::Result<Vec<String>> {
    let file_of = |name: &str| {
        let base = format!("/{}.ko", name.replace('_', "-"));
        let base2 = format!("/{name}.ko");
        modules_dep.lines().find_map(|l| {
            let (path, _) = l.split_once(':')?;
            let p = format!("/{path}");
            (p.ends_with(&base) || p.ends_with(&base2)).then(|| path.to_string())
        })
    };
    let mut out: Vec<String> = Vec::new();
    for name in names {
        let path =
            file_of(name).with_context(|| format!("module {name} not found in modules.dep"))?;
        let deps_line = modules_dep
            .lines()
            .find(|l| l.starts_with(&format!("{path}:")))
            .unwrap_or_default();
        let deps = deps_line.split_once(':').map(|x| x.1).unwrap_or_default();
        for p in deps
            .split_whitespace()
            .chain(std::iter::once(path.as_str()))
        {
            if !out.iter().any(|o| o == p) {
                out.push(p.to_string());
            }
        }
    }
    Ok(out)
}

const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
# sbx nested test host: PID 1 of the first-level VM.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /scratch /host
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "sbx-nested: $*" > /dev/ttyS0; poweroff -f; }
for m in virtio_pci 9pnet_virtio 9p overlay; do modprobe $m || fail "cannot load $m"; done
modprobe kvm_amd npt=1 || echo "sbx-nested: kvm_amd did not load; no /dev/kvm" > /dev/ttyS0
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $opts scratch /scratch || fail "cannot mount the scratch share"
. /scratch/nested.env
mount -t 9p -o $opts,ro,cache=loose hostroot /host || fail "cannot mount the host root"
# /tmp shows the host's files (a checkout may live there) but writes stay in the VM.
mkdir -p /tmpw && mount -t tmpfs tmpfs /tmpw && mkdir -p /tmpw/upper /tmpw/work
chmod 1777 /tmpw/upper
mount -t overlay overlay -o lowerdir=/host/tmp,upperdir=/tmpw/upper,workdir=/tmpw/work /host/tmp \
  || fail "cannot mount the /tmp overlay"
mount -t tmpfs -o mode=0755 tmpfs /host/run
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
# cgroup2, as a systemd host has it: sessions make cgroups of their own.
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup || fail "cannot mount cgroup2"
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mkdir -p "/host$NESTED_SCRATCH" && mount --bind /scratch "/host$NESTED_SCRATCH"
i=0
for d in $NESTED_RW; do
  # cache=loose keeps one inode per file, as Landlock's rules need.
  mkdir -p "/host$d" && mount -t 9p -o $opts,cache=loose "rw$i" "/host$d" || fail "cannot mount $d"
  i=$((i+1))
done
# Test servers listen on the loopback.
ip link set lo up || fail "cannot bring up lo"
# With --net: QEMU's user-mode NAT (guest 10.0.2.15, gateway 10.0.2.2).
if [ -n "$NESTED_NET" ]; then
  modprobe virtio_net || fail "cannot load virtio_net"
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
    || fail "cannot configure eth0"
fi
chroot /host /bin/sh "$NESTED_SCRATCH/run.sh" > /scratch/stdout 2> /scratch/stderr < /dev/null
echo $? > /scratch/exit.tmp && mv /scratch/exit.tmp /scratch/exit
sync
poweroff -f
"#;

fn host_image() -> anyhow::Result<HostImage> {
    deps::ensure(deps::NESTED)?;
    let cache = paths::cache_dir();
    let (dir, release) = unpacked_kernel(&cache)?;
    let initramfs = dir.join("initramfs.cpio");
    // Rebuilt each time: cheap, and it follows changes to INIT_SCRIPT.
    let modules_dir = dir.join("modules");
    let dep = std::fs::read_to_string(modules_dir.join("modules.dep"))?;
    let mut a = Archive::default();
    for d in [
        "bin",
        "dev",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "scratch",
        "host",
    ] {
        a.dir(d);
    }
    a.char_dev("dev/console", 0o600, 5, 1);
    a.file("bin/busybox", 0o755, &std::fs::read(rootfs::BUSYBOX)?);
    a.file("init", 0o755, INIT_SCRIPT.as_bytes());
    let mod_root = format!("lib/modules/{release}");
    a.dir(&mod_root);
    let mut made_dirs: Vec<String> = Vec::new();
    let closure = module_closure(&dep, MODULES)?;
    for rel in &closure {
        let mut prefix = mod_root.clone();
        for part in Path::new(rel).parent().into_iter().flat_map(|p| p.iter()) {
            prefix = format!("{prefix}/{}", part.to_string_lossy());
            if !made_dirs.contains(&prefix) {
                a.dir(&prefix);
                made_dirs.push(prefix.clone());
            }
        }
        a.file(
            &format!("{mod_root}/{rel}"),
            0o644,
            &std::fs::read(modules_dir.join(rel))?,
        );
    }
    let kept: String = dep
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(p, _)| closure.iter().any(|c| c == p))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    a.file(&format!("{mod_root}/modules.dep"), 0o644, kept.as_bytes());
    paths::write_atomic(&initramfs, &a.finish())?;
    Ok(HostImage {
        vmlinuz: dir.join("vmlinuz"),
        initramfs,
    })
}

/// Single-quotes `s` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn write_run_files(scratch: &Path, args: &Args, cwd: &Path) -> anyhow::Result<()> {
    let mut env = String::new();
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !k.is_empty() {
            env.push_str(&format!("export {k}={}\n", sh_quote(v)));
        }
    }
    env.push_str(&format!(
        // The host's home is read-only in here; audit logs go to scratch
        // unless the caller chose a place.
        "export SBX_NESTED=1\nexport SBX_NESTED_SCRATCH={}\n\
         export SBX_STATE_DIR=\"${{SBX_STATE_DIR:-$SBX_NESTED_SCRATCH/state}}\"\n",
        sh_quote(&scratch.to_string_lossy())
    ));
    let argv: Vec<String> = args.command.iter().map(|a| sh_quote(a)).collect();
    let run = format!(
        "{env}cd {} || exit 125\nexec {}\n",
        sh_quote(&cwd.to_string_lossy()),
        argv.join(" ")
    );
    std::fs::write(scratch.join("run.sh"), run)?;
    let rw: Vec<String> = args
        .rw
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    std::fs::write(
        scratch.join("nested.env"),
        format!(
            "NESTED_SCRATCH={}\nNESTED_RW={}\nNESTED_NET={}\n",
            sh_quote(&scratch.to_string_lossy()),
            sh_quote(&rw.join(" ")),
            if args.net { "1" } else { "" }
        ),
    )?;
    Ok(())
}

/// Copies whatever was appended to `path` since `offset` to `out`.
fn pump(path: &Path, offset: &mut u64, out: &mut dyn Write) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return;
    };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if let Ok(n) = f.read_to_end(&mut buf) {
        *offset += n as u64;
        let _ = out.write_all(&buf);
        let _ = out.flush();
    }
}

/// Forwards the command's new stdout and stderr to ours.
fn pump_outputs(scratch: &Path, offsets: &mut (u64, u64)) {
    pump(
        &scratch.join("stdout"),
        &mut offsets.0,
        &mut std::io::stdout(),
    );
    pump(
        &scratch.join("stderr"),
        &mut offsets.1,
        &mut std::io::stderr(),
    );
}

fn make_scratch() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for i in 0..100 {
        let p = base.join(format!("sbx-nested-{}-{i}", std::process::id()));
        if std::fs::create_dir(&p).is_ok() {
            return Ok(p);
        }
    }
    bail!("cannot create a scratch directory in {}", base.display())
}

impl Args {
    /// `command` with the defaults the command line would give, and `timeout`.
    pub fn for_command(command: Vec<String>, timeout: u64) -> Args {
        Args {
            timeout,
            mem: DEFAULT_MEM_MIB,
            rw: vec![],
            keep: false,
            net: false,
            command,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    for d in &args.rw {
        if !d.is_absolute() || !d.is_dir() {
            bail!(
                "--rw {}: must be an existing directory given by absolute path",
                d.display()
            );
        }
    }
    let image = host_image()?;
    let cwd = std::env::current_dir()?;
    let scratch = make_scratch()?;
    write_run_files(&scratch, &args, &cwd)?;

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-M", "q35", "-cpu", "EPYC", "-smp", "1"])
        .arg("-m")
        .arg(args.mem.to_string())
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&image.vmlinuz)
        .arg("-initrd")
        .arg(&image.initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
        .arg("-serial")
        .arg(format!("file:{}", scratch.join("console.log").display()))
        .args(virtfs("hostroot", Path::new("/"), true))
        .args(virtfs("scratch", &scratch, false));
    for (i, d) in args.rw.iter().enumerate() {
        qemu.args(virtfs(&format!("rw{i}"), d, false));
    }
    if args.net {
        qemu.args([
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0",
        ]);
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = qemu.spawn().context("cannot start qemu-system-x86_64")?;

    let start = Instant::now();
    let mut offsets = (0u64, 0u64);
    let timed_out = loop {
        pump_outputs(&scratch, &mut offsets);
        if child.try_wait()?.is_some() {
            break false;
        }
        if start.elapsed() > Duration::from_secs(args.timeout) {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    pump_outputs(&scratch, &mut offsets);
    let mut qemu_err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut qemu_err);
    }

    let exit = std::fs::read_to_string(scratch.join("exit"))
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok());
    let result = match (timed_out, exit) {
        (true, _) => {
            eprintln!(
                "xtask nested: timed out after {}s; the nested host was killed",
                args.timeout
            );
            show_console(&scratch);
            Ok(EXIT_TIMEOUT)
        }
        (false, Some(code)) => Ok(code),
        (false, None) => {
            show_console(&scratch);
            Err(anyhow::anyhow!(
                "the nested host stopped without running the command to completion{}",
                if qemu_err.trim().is_empty() {
                    String::new()
                } else {
                    format!("; qemu said: {}", qemu_err.trim())
                }
            ))
        }
    };
    if args.keep {
        eprintln!("xtask nested: scratch kept at {}", scratch.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    result
}

fn virtfs(tag: &str, path: &Path, readonly: bool) -> Vec<String> {
    vec![
        "-fsdev".into(),
        format!(
            "local,id={tag},path={},security_model=none,multidevs=remap{}",
            path.display(),
            if readonly { ",readonly=on" } else { "" }
        ),
        "-device".into(),
        format!("virtio-9p-pci,fsdev={tag},mount_tag={tag}"),
    ]
}

fn show_console(scratch: &Path) {
    if let Ok(log) = std::fs::read_to_string(scratch.join("console.log")) {
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        eprintln!("--- nested host console (last {} lines) ---", tail.len());
        for l in tail {
            eprintln!("{l}");
        }
        eprintln!("---");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closure_lists_dependencies_first() {
        let dep = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n\
                   kernel/net/9p/9pnet.ko:\n\
                   kernel/fs/netfs/netfs.ko:\n\
                   kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko\n";
        let c = module_closure(dep, &["9p", "kvm_amd"]).unwrap();
        assert_eq!(
            c,
            [
                "kernel/net/9p/9pnet.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/9p/9p.ko",
                "kernel/arch/x86/kvm/kvm.ko",
                "kernel/arch/x86/kvm/kvm-amd.ko"
            ]
        );
        assert!(module_closure(dep, &["nope"]).is_err());
    }

    #[test]
    fn quoting_survives_sh() {
        let s = "it's a \"test\" $HOME";
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", sh_quote(s)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), s);
    }
}
