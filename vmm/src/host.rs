//! What this host's KVM can do: whether sandboxes can boot here directly.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";

use crate::arch::x86_64::cpuid::signature;
pub use crate::arch::x86_64::cpuid::Vendor as CpuVendor;

/// Which KVM backs the device node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum KvmBackend {
    /// Hardware-assisted KVM (kvm_intel with VT-x, kvm_amd with AMD-V).
    Hardware { module: String },
    /// kvm_pvm: a software nested virtualiser that cannot run standard guest kernels.
    Pvm,
    /// A /dev/kvm whose provider we cannot tell.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum KvmAccess {
    Missing,
    PermissionDenied,
    Error { detail: String },
    Usable { api_version: i32, max_vcpus: usize },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HostKvm {
    pub path: PathBuf,
    pub cpu_vendor: CpuVendor,
    /// The CPU advertises VT-x (vmx) or AMD-V (svm) to this kernel.
    pub hw_virt_flag: bool,
    pub backend: KvmBackend,
    pub access: KvmAccess,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{path} does not exist: this host has no KVM. Enable VT-x/AMD-V in the firmware and load kvm_intel or kvm_amd (modprobe kvm_amd), or run on a KVM-enabled machine")]
    Missing { path: String },
    #[error("permission denied opening {path}: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again) or run as root")]
    PermissionDenied { path: String },
    #[error("cannot open {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("{path} is provided by kvm_pvm, a software nested virtualiser that cannot boot standard Linux guests. On this host, run sbx inside the nested test host: cargo xtask nested -- sbx boot ...")]
    Pvm { path: String },
}

pub fn host_cpu_vendor() -> CpuVendor {
    let r = std::arch::x86_64::__cpuid(0);
    CpuVendor::from_leaf0(r.ebx, r.edx, r.ecx)
}

/// True when this host is itself a guest of QEMU's software emulation (TCG),
/// as the nested test host is. TCG does not intercept a nested guest's XSETBV,
/// so guests booted here need `noxsave`. TCG announces itself in the
/// hypervisor CPUID leaf.
pub fn nested_under_tcg() -> bool {
    let r = std::arch::x86_64::__cpuid(0x4000_0000);
    &signature([r.ebx, r.ecx, r.edx]) == b"TCGTCGTCGTCG"
}

fn hw_virt_flag() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

fn backend() -> KvmBackend {
    let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
    for module in ["kvm_intel", "kvm_amd"] {
        if loaded(module) {
            return KvmBackend::Hardware {
                module: module.to_string(),
            };
        }
    }
    if loaded("kvm_pvm") {
        KvmBackend::Pvm
    } else {
        KvmBackend::Unknown
    }
}

fn access(path: &Path) -> KvmAccess {
    if !path.exists() {
        return KvmAccess::Missing;
    }
    match open_kvm(path) {
        Ok(kvm) => KvmAccess::Usable {
            api_version: kvm.get_api_version(),
            max_vcpus: kvm.get_max_vcpus(),
        },
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            KvmAccess::PermissionDenied
        }
        Err(e) => KvmAccess::Error {
            detail: e.to_string(),
        },
    }
}

/// Opens a KVM device node by path.
pub fn open_kvm(path: &Path) -> Result<kvm_ioctls::Kvm, kvm_ioctls::Error> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    kvm_ioctls::Kvm::new_with_path(c)
}

pub fn probe(path: &Path) -> HostKvm {
    HostKvm {
        path: path.to_path_buf(),
        cpu_vendor: host_cpu_vendor(),
        hw_virt_flag: hw_virt_flag(),
        backend: backend(),
        access: access(path),
    }
}

/// Ok when guests can boot on the KVM at `path`, probed once per process
/// and path: a session checks before it opens its policy and audit log
/// (so that this error comes first) and the VMM checks again before it
/// creates the VM; the second check costs nothing. Only success is kept,
/// so a failure is probed again next time.
pub fn ensure_bootable(path: &Path) -> Result<(), HostError> {
    static BOOTABLE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut bootable = BOOTABLE.lock().unwrap_or_else(|e| e.into_inner());
    if bootable.iter().any(|p| p == path) {
        return Ok(());
    }
    probe(path).check_bootable()?;
    bootable.push(path.to_path_buf());
    Ok(())
}

impl HostKvm {
    /// Ok when a standard guest kernel can boot on this KVM; otherwise the reason and what to do.
    pub fn check_bootable(&self) -> Result<(), HostError> {
        let path = self.path.display().to_string();
        match &self.access {
            KvmAccess::Missing => return Err(HostError::Missing { path }),
            KvmAccess::PermissionDenied => return Err(HostError::PermissionDenied { path }),
            KvmAccess::Error { detail } => {
                return Err(HostError::Open {
                    path,
                    detail: detail.clone(),
                })
            }
            KvmAccess::Usable { .. } => {}
        }
        if self.backend == KvmBackend::Pvm {
            return Err(HostError::Pvm { path });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(backend: KvmBackend, access: KvmAccess) -> HostKvm {
        HostKvm {
            path: PathBuf::from("/dev/kvm"),
            cpu_vendor: CpuVendor::Amd,
            hw_virt_flag: true,
            backend,
            access,
        }
    }

    #[test]
    fn pvm_is_refused_naming_the_nested_host() {
        let usable = KvmAccess::Usable {
            api_version: 12,
            max_vcpus: 4,
        };
        let err = host(KvmBackend::Pvm, usable.clone())
            .check_bootable()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("kvm_pvm") && msg.contains("nested"), "{msg}");
        let hw = KvmBackend::Hardware {
            module: "kvm_amd".into(),
        };
        assert!(host(hw, usable).check_bootable().is_ok());
    }

    #[test]
    fn missing_and_denied_say_what_to_do() {
        let e = host(KvmBackend::Unknown, KvmAccess::Missing).check_bootable();
        assert!(e.unwrap_err().to_string().contains("modprobe"));
        let e = host(KvmBackend::Unknown, KvmAccess::PermissionDenied).check_bootable();
        assert!(e.unwrap_err().to_string().contains("kvm group"));
    }

    #[test]
    fn missing_device_is_detected() {
        let h = probe(Path::new("/nonexistent/kvm"));
        assert_eq!(h.access, KvmAccess::Missing);
    }

    #[test]
    fn a_failed_check_is_not_remembered() {
        let p = Path::new("/nonexistent/kvm");
        assert!(matches!(ensure_bootable(p), Err(HostError::Missing { .. })));
        assert!(matches!(ensure_bootable(p), Err(HostError::Missing { .. })));
    }
}
