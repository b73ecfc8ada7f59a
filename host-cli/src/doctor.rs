//! `sbx doctor`: what this host can do, with one next step per problem.

use std::path::{Path, PathBuf};

use vmm::host::{self, CpuVendor, KvmAccess, KvmBackend};

use sandbox::paths;

#[derive(clap::Args)]
pub struct Args {
    /// KVM device node to check.
    #[arg(long, default_value = host::DEFAULT_KVM_PATH)]
    kvm: PathBuf,
    /// Print the findings as JSON.
    #[arg(long)]
    json: bool,
}

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: Option<String>,
}

fn artifact(name: &'static str, path: &Path, build: &str) -> Check {
    let ok = path.is_file();
    Check {
        name,
        ok,
        detail: if ok {
            format!("{} (built)", path.display())
        } else {
            format!("{} (missing)", path.display())
        },
        fix: (!ok).then(|| format!("build it: {build}")),
    }
}

/// Below this, a share of a big tree runs out of watches early.
const FEW_WATCHES: usize = 65_536;

/// Shares follow host edits with inotify, a watch per directory the guest
/// knows, a session's shares together at most half the user's allowance.
/// Not a failure: past it the guest trusts its cache for a second instead
/// of a minute.
fn file_watches() -> Check {
    use vmm::devices::virtio::fs::{share_watches, user_watches, USER_WATCHES};
    let (detail, fix) = match user_watches() {
        Some(n) => (
            format!(
                "{n} inotify watches: a session's shares follow host edits in up to {} directories",
                share_watches(n)
            ),
            (n < FEW_WATCHES).then(|| {
                "for big trees, raise it: sudo sysctl fs.inotify.max_user_watches=524288"
                    .to_string()
            }),
        ),
        None => (
            format!("cannot read {USER_WATCHES}: shares trust their cache for a second"),
            None,
        ),
    };
    Check {
        name: "file watches",
        ok: true,
        detail,
        fix,
    }
}

/// Sessions confine themselves with Landlock, as far as the kernel can.
/// Not a failure without it: sessions then run unconfined.
fn landlock() -> Check {
    let (detail, fix) = match sandbox::confine::abi() {
        Some(abi) => (
            format!("Landlock ABI {abi}: sessions confine themselves to their state, audit log and shares"),
            None,
        ),
        None => (
            "no Landlock in this kernel: sessions run unconfined on the host's file systems".to_string(),
            Some("use a kernel with Landlock enabled (Linux 5.13 or newer, `lsm=landlock,...`)".to_string()),
        ),
    };
    Check {
        name: "Landlock",
        ok: true,
        detail,
        fix,
    }
}

/// Sessions filter every thread's system calls; without seccomp they do
/// not start (unless run with --unsafe-no-seccomp).
fn seccomp() -> Check {
    let (ok, detail, fix) = match sbx_seccomp::available() {
        Ok(()) => (
            true,
            format!(
                "filters for {} kinds of session thread; a call outside a thread's list stops the session",
                sbx_seccomp::Kind::ALL.len()
            ),
            None,
        ),
        Err(e) => (
            false,
            e,
            Some("use a kernel built with CONFIG_SECCOMP_FILTER (every distribution kernel is)".to_string()),
        ),
    };
    Check {
        name: "seccomp",
        ok,
        detail,
        fix,
    }
}

fn checks(kvm_path: &Path) -> (Vec<Check>, host::HostKvm) {
    let h = host::probe(kvm_path);
    let mut out = Vec::new();
    let (ok, detail, fix) = match &h.access {
        KvmAccess::Usable {
            api_version,
            max_vcpus,
        } => (
            true,
            format!("{} opens (KVM API {api_version}, up to {max_vcpus} vCPUs)", kvm_path.display()),
            None,
        ),
        KvmAccess::Missing => (
            false,
            format!("{} does not exist", kvm_path.display()),
            Some("enable VT-x/AMD-V in the firmware and load kvm_intel or kvm_amd (modprobe kvm_amd), or use a KVM-enabled machine".into()),
        ),
        KvmAccess::PermissionDenied => (
            false,
            format!("{}: permission denied", kvm_path.display()),
            Some("add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again) or run as root".into()),
        ),
        KvmAccess::Error { detail } => (
            false,
            format!("{}: {detail}", kvm_path.display()),
            Some("check that the kvm module loaded cleanly (dmesg | grep -i kvm)".into()),
        ),
    };
    out.push(Check {
        name: "KVM device",
        ok,
        detail,
        fix,
    });

    let (ok, detail, fix) = match &h.backend {
        KvmBackend::Hardware { module } => (true, format!("{module} (hardware virtualisation)"), None),
        KvmBackend::Pvm => (
            false,
            "kvm_pvm: a software nested virtualiser; standard guest kernels cannot boot on it".to_string(),
            Some("real guests need the nested test host here: cargo xtask nested -- sbx boot -- uname -a (cargo xtask demo does this for you)".into()),
        ),
        KvmBackend::Unknown => (
            h.access != KvmAccess::Missing && h.hw_virt_flag,
            "no kvm_intel, kvm_amd or kvm_pvm module found".to_string(),
            Some("load kvm_intel or kvm_amd (modprobe kvm_amd)".into()),
        ),
    };
    out.push(Check {
        name: "KVM provider",
        ok,
        detail,
        fix: if ok { None } else { fix },
    });

    let vendor = match h.cpu_vendor {
        CpuVendor::Intel => "Intel",
        CpuVendor::Amd => "AMD",
        CpuVendor::Other => "other",
    };
    out.push(Check {
        name: "CPU",
        ok: true,
        detail: format!(
            "{vendor}; {} to this kernel",
            if h.hw_virt_flag {
                "VT-x/AMD-V visible"
            } else {
                "no VT-x/AMD-V flag visible"
            }
        ),
        fix: None,
    });
    out.push(file_watches());
    out.push(landlock());
    out.push(seccomp());
    out.push(artifact(
        "guest kernel",
        &paths::default_kernel(),
        "cargo xtask kernel",
    ));
    out.push(artifact(
        "guest rootfs",
        &paths::default_initrd(),
        "cargo xtask rootfs",
    ));
    (out, h)
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let (checks, host) = checks(&args.kvm);
    let ready = checks.iter().all(|c| c.ok);
    if args.json {
        let items: Vec<_> = checks
            .iter()
            .map(|c| serde_json::json!({"check": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix}))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "ready": ready, "host": host, "checks": items })
        );
    } else {
        for c in &checks {
            println!(
                "{} {:<14} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
            if let Some(fix) = &c.fix {
                println!("     {:<14} next: {fix}", "");
            }
        }
        println!();
        if ready {
            println!("Sandboxes can run on this host: try `sbx boot -- uname -a`.");
        } else {
            println!("Sandboxes cannot run directly on this host; fix the FAIL lines above.");
        }
    }
    Ok(if ready { 0 } else { 1 })
}
