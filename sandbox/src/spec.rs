//! What a session is, as data. A [`SessionSpec`] is built once, from
//! command-line flags or from code, checked, written to the session's
//! directory as `spec.json`, and read by the session process. Nothing
//! about a session travels any other way.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use sbx_policy::{Locations, NetHost, Selection};
use sbx_protocol::cmdline::check_guest_path;
use serde::{Deserialize, Serialize};
use vmm::devices::virtio::fs::FsCache;

use crate::error::{fail, At, Error, Result};
use crate::{paths, state};

/// Where the current directory appears in the guest.
pub const WORKSPACE: &str = "/workspace";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// Letters, digits, `-`, `_` and `.`; names the session's directory
    /// and its audit log.
    pub name: String,
    pub vm: VmSpec,
    /// Host directories shared with the guest, besides the policy's own
    /// `[[mount]]`s.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// How long the guest may trust what it learnt about shared files.
    pub fs_cache: FsCache,
    /// Bytes the guest may add to files in its shares, in all (None: as
    /// much as the host's disk holds).
    #[serde(default)]
    pub share_quota: Option<u64>,
    pub policy: PolicySpec,
    #[serde(default)]
    pub egress: EgressSpec,
    /// Environment every command in the session gets, before the secrets'
    /// placeholders and the caller's own.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The guest's root from an image; None keeps the initramfs as root.
    #[serde(default)]
    pub root: Option<RootSpec>,
    /// Who commands run as when a request names no user (None: root).
    #[serde(default)]
    pub user: Option<String>,
    /// The workspace is a clone of the repository shared read-only at
    /// [`workspace::ORIGIN`](crate::workspace::ORIGIN), made on the
    /// session's own disk when it starts.
    #[serde(default)]
    pub clone_workspace: bool,
    /// The MCP servers the session's gateway serves (none: no gateway).
    #[serde(default)]
    pub mcp: Vec<sbx_mcp::ServerSpec>,
    /// Runs the session process without its seccomp filters. Off unless
    /// asked for by this name: a spec without it is filtered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsafe_no_seccomp: bool,
}

/// A root file system from an image, with the session's writable layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSpec {
    /// The image's name in the store, and its manifest digest when the
    /// spec was made.
    pub image: String,
    pub digest: String,
    /// The image's read-only root file system.
    pub path: PathBuf,
    /// Layers saved from earlier sessions (a template's build) that stack
    /// over it, topmost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub saved: Vec<PathBuf>,
    /// The writable layer's size in bytes (sparse: only what is written
    /// takes host disk); None: 8 GiB, or the policy's `disk_mib` if less.
    #[serde(default)]
    pub layer_size: Option<u64>,
    /// The image's own environment (`NAME=VALUE`).
    #[serde(default)]
    pub env: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpus: u32,
    pub mem_mib: u64,
    /// The KVM device node.
    pub kvm: PathBuf,
    /// Uncompressed ELF kernel.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Default for VmSpec {
    /// 1 vCPU, 256 MiB, the kernel and initramfs `cargo xtask` builds (or
    /// `$SBX_KERNEL` and `$SBX_INITRD`).
    fn default() -> Self {
        VmSpec {
            vcpus: 1,
            mem_mib: 256,
            kvm: vmm::host::DEFAULT_KVM_PATH.into(),
            kernel: paths::default_kernel(),
            initrd: paths::default_initrd(),
        }
    }
}

/// One shared directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// An existing host directory, canonical.
    pub host: PathBuf,
    /// An absolute guest path.
    pub guest: String,
    pub read_only: bool,
}

impl std::fmt::Display for MountSpec {
    /// `HOST:GUEST:ro|rw`, as `--mount` takes it and audit records name it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.read_only { "ro" } else { "rw" };
        write!(f, "{}:{}:{mode}", self.host.display(), self.guest)
    }
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(p),
    }
}

impl MountSpec {
    /// Parses `HOST:GUEST[:ro|rw]`; the host directory must exist.
    /// Read-only unless `:rw` is given, as in policy files.
    pub fn parse(spec: &str) -> Result<MountSpec> {
        let usage = || {
            format!("--mount `{spec}`: expected HOST:GUEST[:ro|rw], for example --mount ~/src/lib:/lib:ro")
        };
        let (rest, read_only) = match spec.rsplit_once(':') {
            Some((r, "ro")) => (r, true),
            Some((r, "rw")) => (r, false),
            _ => (spec, true),
        };
        let Some((host, guest)) = rest.rsplit_once(':') else {
            return Err(Error::Invalid(usage()));
        };
        if host.is_empty() || !guest.starts_with('/') {
            fail!(Invalid, "{}; the guest path must be absolute", usage());
        }
        if let Err(e) = check_guest_path(guest) {
            fail!(Invalid, "--mount `{spec}`: {e}");
        }
        let host = expand_home(host);
        let canonical = std::fs::canonicalize(&host)
            .at(|| format!("--mount `{spec}`: cannot use {}", host.display()))?;
        if !canonical.is_dir() {
            fail!(
                Invalid,
                "--mount `{spec}`: {} is not a directory (only directories are shared)",
                canonical.display()
            );
        }
        Ok(MountSpec {
            host: canonical,
            guest: guest.to_string(),
            read_only,
        })
    }

    /// The workspace: `dir` read-write at /workspace. `/` and the home
    /// directory are refused: sharing them whole is never what was meant.
    pub fn workspace(dir: &Path) -> Result<MountSpec> {
        let host = std::fs::canonicalize(dir)
            .at(|| format!("cannot share the current directory {}", dir.display()))?;
        let home = std::env::var_os("HOME").and_then(|h| std::fs::canonicalize(h).ok());
        if host == Path::new("/") || Some(&host) == home.as_ref() {
            fail!(
                Invalid,
                "the current directory {} would be shared read-write at {WORKSPACE}; run sbx from a project directory, or pass --no-workspace",
                host.display()
            );
        }
        Ok(MountSpec {
            host,
            guest: WORKSPACE.into(),
            read_only: false,
        })
    }
}

/// Which policy the session runs under, and where its layers were looked
/// for (fixed when the spec is built, so the session process finds the
/// same files wherever it runs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub selection: Selection,
    pub locations: Locations,
}

impl PolicySpec {
    /// `selection` as given in the current directory, with the layers
    /// looked for from there.
    pub fn here(selection: &Selection) -> Result<PolicySpec> {
        let cwd = std::env::current_dir().at(|| "cannot read the current directory".into())?;
        Ok(PolicySpec {
            selection: selection.anchored(&cwd),
            locations: Locations::from_env(&cwd),
        })
    }

    pub fn load(&self) -> Result<sbx_policy::Policy> {
        self.selection.load(&self.locations).map_err(Error::Policy)
    }
}

/// A name the egress proxy resolves to a fixed address (the policy still
/// checks the address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub name: String,
    pub addr: IpAddr,
}

impl Pin {
    /// Reads `NAME:ADDR` (an IPv6 ADDR may be in brackets), like curl's
    /// `--resolve`.
    pub fn parse(spec: &str) -> Result<Pin> {
        let usage = || {
            format!(
                "--resolve `{spec}`: expected NAME:ADDR, for example --resolve api.test:127.0.0.2"
            )
        };
        let Some((name, addr)) = spec.split_once(':') else {
            return Err(Error::Invalid(usage()));
        };
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let Ok(addr) = addr.parse() else {
            return Err(Error::Invalid(usage()));
        };
        match sbx_policy::normalize_host(name) {
            Ok(NetHost::Name(name)) => Ok(Pin { name, addr }),
            _ => fail!(Invalid, "{}: `{name}` is not a host name", usage()),
        }
    }
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.addr)
    }
}

/// The session's egress proxy, beyond what the policy says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressSpec {
    /// More CAs (PEM files) to trust for upstream TLS, besides the system's.
    #[serde(default)]
    pub upstream_ca: Vec<PathBuf>,
    #[serde(default)]
    pub resolve: Vec<Pin>,
}

/// Reads a size: bytes, or a number with K, M, G or T (powers of 1,024;
/// `KiB`, `MB` and the like mean the same).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let shift = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => fail!(
            Invalid,
            "`{text}` is not a size: write bytes, or a number with K, M, G or T (512M, 10G)"
        ),
    };
    match n
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
    {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => fail!(
            Invalid,
            "`{text}` is not a size: write bytes, or a number with K, M, G or T (512M, 10G)"
        ),
    }
}

impl SessionSpec {
    /// A session named `name` under the policy `selection` names, as seen
    /// from the current directory, with the defaults `sbx start` uses: the
    /// [`VmSpec`] defaults, no shares, `auto` caching, no egress settings,
    /// no extra env.
    pub fn new(name: &str, selection: &Selection) -> Result<SessionSpec> {
        state::check_name(name)?;
        Ok(SessionSpec {
            name: name.to_string(),
            vm: VmSpec::default(),
            mounts: Vec::new(),
            fs_cache: FsCache::Auto,
            share_quota: None,
            policy: PolicySpec::here(selection)?,
            egress: EgressSpec::default(),
            env: Vec::new(),
            root: None,
            user: None,
            clone_workspace: false,
            mcp: Vec::new(),
            unsafe_no_seccomp: false,
        })
    }

    /// Where commands start when a request names no directory: the
    /// workspace, when one is shared.
    pub fn workdir(&self) -> Option<&str> {
        (self.clone_workspace || self.mounts.iter().any(|m| m.guest == WORKSPACE))
            .then_some(WORKSPACE)
    }

    /// Checks what can be checked before anything starts, so a typo is
    /// reported as one, naming what to change.
    pub fn validate(&self) -> Result<()> {
        state::check_name(&self.name)?;
        if self.vm.vcpus == 0 {
            fail!(Invalid, "a session needs at least one vCPU");
        }
        for (i, m) in self.mounts.iter().enumerate() {
            if !m.guest.starts_with('/') {
                fail!(Invalid, "mount {m}: the guest path must be absolute");
            }
            if let Err(e) = check_guest_path(&m.guest) {
                fail!(Invalid, "mount {m}: {e}");
            }
            if !m.host.is_dir() {
                fail!(
                    Invalid,
                    "mount {m}: {} is not a directory on this host",
                    m.host.display()
                );
            }
            if self.mounts[..i].iter().any(|o| o.guest == m.guest) {
                fail!(
                    Invalid,
                    "mount {m}: {} is shared twice; one guest path has one host directory",
                    m.guest
                );
            }
        }
        for ca in &self.egress.upstream_ca {
            if !ca.is_file() {
                fail!(
                    Invalid,
                    "upstream CA {} is not a readable file",
                    ca.display()
                );
            }
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                fail!(Invalid, "environment variable name {k:?} is not a NAME");
            }
        }
        Ok(())
    }

    /// Reads and checks a spec written by [`SessionSpec::write`].
    pub fn read(path: &Path) -> Result<SessionSpec> {
        let spec: SessionSpec = state::read_json(path, "a session spec")?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        state::write_json(path, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_specs() {
        let tmp = std::env::temp_dir();
        let t = tmp.to_str().unwrap();
        let m = MountSpec::parse(&format!("{t}:/data")).unwrap();
        assert!(m.read_only);
        assert_eq!(m.guest, "/data");
        let m = MountSpec::parse(&format!("{t}:/data:rw")).unwrap();
        assert!(!m.read_only);
        assert_eq!(MountSpec::parse(&m.to_string()).unwrap(), m);
        for bad in [
            "nocolon",
            "/tmp:relative",
            ":/x",
            "/tmp:/with space",
            "/no/such/dir:/x",
        ] {
            assert!(MountSpec::parse(bad).is_err(), "{bad}");
        }
        let e = MountSpec::parse("/etc/hostname:/x").unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("1 gb").unwrap(), 1 << 30);
        for bad in ["", "0", "M", "1.5G", "12X", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pins_read_like_curls_resolve() {
        let p = Pin::parse("API.test:[::1]").unwrap();
        assert_eq!(p.name, "api.test");
        assert_eq!(p.addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            Pin::parse("x.test:127.0.0.2").unwrap().to_string(),
            "x.test:127.0.0.2"
        );
        for bad in ["noaddr", "x.test:not-an-ip", "10.0.0.1:10.0.0.2"] {
            assert!(Pin::parse(bad).is_err(), "{bad}");
        }
    }

    /// What the coming features do: build a session from code, no CLI.
    #[test]
    fn a_spec_built_from_code_round_trips_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let mut spec = SessionSpec::new("from-code", &Selection::default()).unwrap();
        spec.vm.vcpus = 2;
        spec.vm.mem_mib = 512;
        spec.mounts.push(MountSpec::workspace(&share).unwrap());
        spec.mounts.push(MountSpec {
            host: share.clone(),
            guest: "/ref".into(),
            read_only: true,
        });
        spec.egress
            .resolve
            .push(Pin::parse("api.test:127.0.0.2").unwrap());
        spec.env.push(("AGENT".into(), "claude".into()));
        spec.validate().unwrap();
        assert_eq!(spec.workdir(), Some(WORKSPACE));

        let path = dir.path().join("spec.json");
        spec.write(&path).unwrap();
        assert_eq!(SessionSpec::read(&path).unwrap(), spec);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["fs_cache"], "auto");
        assert_eq!(json["mounts"][0]["guest"], WORKSPACE);

        // Each mistake is named.
        let mut twice = spec.clone();
        twice.mounts.push(twice.mounts[1].clone());
        assert!(twice.validate().unwrap_err().to_string().contains("twice"));
        let mut spaced = spec.clone();
        spaced.mounts[1].guest = "/with space".into();
        assert!(spaced.validate().is_err());
        let mut none = spec.clone();
        none.vm.vcpus = 0;
        assert!(none.validate().is_err());
        assert!(SessionSpec::new("../escape", &Selection::default()).is_err());
        // A spec edited on disk into nonsense is refused when read.
        std::fs::write(&path, "{\"name\": 3}").unwrap();
        let e = SessionSpec::read(&path).unwrap_err().to_string();
        assert!(e.contains("is not a session spec"), "{e}");
    }
}
