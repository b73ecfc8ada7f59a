//! `sbx policy`: check, explain, show, keygen and sign.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use sbx_policy::{
    Access, Answer, Decision, Locations, Policy, PolicyBuilder, Question, RuleInfo, Selection,
    Surface,
};

/// Exit status of `explain` for a denial; 2 is for usage and policy errors.
const EXIT_DENY: u8 = 1;
const EXIT_POLICY_ERROR: u8 = 2;

/// Which policy to evaluate. Without --policy, sbx reads the files that
/// exist of: $SBX_SYSTEM_DIR (/etc/sbx)/policy.bundle or policy.toml (org),
/// ~/.config/sbx/policy.toml (team), ./.sbx/policy.toml (project).
#[derive(clap::Args, Clone, Default)]
pub struct Select {
    /// Policy file or signed bundle; repeat in layer order (org, team,
    /// project). Replaces the files sbx would find on its own.
    #[arg(long = "policy", value_name = "FILE", global = true)]
    pub policy: Vec<PathBuf>,
    /// Preset the files build on: locked-down (the default), balanced, open.
    #[arg(long, value_name = "NAME", global = true)]
    pub preset: Option<String>,
    /// Public key (from `sbx policy keygen`) to trust for signed bundles,
    /// besides /etc/sbx/trusted-keys/*.pub.
    #[arg(long, value_name = "FILE", global = true)]
    pub trusted_key: Vec<PathBuf>,
}

impl Select {
    /// The selection these flags make (discovery is the policy crate's).
    pub fn selection(&self) -> Selection {
        // Policy found rather than named includes the control plane's.
        if self.policy.is_empty() {
            crate::login_cmd::refresh_once();
        }
        Selection {
            files: self.policy.clone(),
            preset: self.preset.clone(),
            trusted_keys: self.trusted_key.clone(),
            texts: Vec::new(),
        }
    }

    pub fn load(&self) -> anyhow::Result<Policy> {
        Ok(self.selection().load(&Locations::here())?)
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate policy files (or the ones sbx finds); errors name the file, line and column.
    Check {
        /// Files to check, in layer order; default: the files sbx finds.
        files: Vec<PathBuf>,
        #[command(flatten)]
        select: Select,
    },
    /// Show how the policy decides one request and which rules led there.
    /// Exits 0 for allow, 1 for deny, 2 for a usage or policy error.
    #[command(after_help = "\
Examples:
  sbx policy explain net registry.npmjs.org:443
  sbx policy explain net api.example.com:443 --resolved 10.0.0.5
  sbx policy explain fs /workspace/.env read
  sbx policy explain mcp github.get_issue '{\"repo\": \"acme/web\"}'
  sbx policy explain credential GITHUB_TOKEN api.github.com
  sbx policy explain exec curl
  sbx policy explain limits 4 2048
  sbx policy explain --preset balanced --policy org.toml net pypi.org:443")]
    Explain {
        #[command(flatten)]
        select: Select,
        /// Print the decision as JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        query: Query,
    },
    /// Print the effective merged policy, each rule with where it came from.
    Show {
        #[command(flatten)]
        select: Select,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create an ed25519 key pair for signing organisation policy bundles.
    Keygen {
        /// Writes PREFIX.key (secret, mode 0600) and PREFIX.pub.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Sign a policy file into a bundle that machines trusting the key accept.
    Sign {
        /// Secret key from `sbx policy keygen`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Policy file to sign.
        file: PathBuf,
        /// Where to write the bundle (default: FILE with extension .bundle).
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Query {
    /// A connection to HOST:PORT ([v6]:PORT for IPv6).
    Net {
        target: String,
        /// The address the name resolved to, checked against address rules too.
        #[arg(long, value_name = "IP")]
        resolved: Option<IpAddr>,
    },
    /// Reading or writing a guest path.
    Fs { path: String, access: AccessArg },
    /// An MCP tool call, SERVER.TOOL, with its arguments as a JSON object.
    Mcp { call: String, args: Option<String> },
    /// Sending secret NAME to HOST.
    Credential { secret: String, host: String },
    /// Running a command in the guest.
    Exec { command: String },
    /// A session with this many vCPUs and MiB of memory.
    Limits { vcpus: u64, memory_mib: u64 },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AccessArg {
    Read,
    Write,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let r = match args.cmd {
        Cmd::Check { files, select } => check(&files, &select),
        Cmd::Explain {
            select,
            json,
            query,
        } => explain(&select, json, query),
        Cmd::Show { select, json } => show(&select, json),
        Cmd::Keygen { out } => keygen(&out),
        Cmd::Sign { key, file, out } => sign(&key, &file, out),
    };
    r.or_else(|e| {
        eprintln!("sbx: {e:#}");
        Ok(EXIT_POLICY_ERROR)
    })
}

fn check(files: &[PathBuf], select: &Select) -> anyhow::Result<u8> {
    let at = Locations::here();
    let selection = select.selection();
    let files = if files.is_empty() {
        selection.files(&at)
    } else {
        files.to_vec()
    };
    let policy = selection.load_files(&files, &at)?;
    for s in policy.sources() {
        let n = policy
            .rules()
            .iter()
            .filter(|r| *r.location.file == *s.name)
            .count();
        let signed = s
            .signed_by
            .as_ref()
            .map(|k| format!(", signed by {k}"))
            .unwrap_or_default();
        println!(
            "ok  {} ({} layer, {}, {n} rules{signed})",
            s.name,
            s.layer,
            s.mode.as_str()
        );
    }
    if files.is_empty() {
        println!("(no policy files given or found; the preset alone applies)");
    }
    Ok(0)
}

fn explain(select: &Select, json: bool, query: Query) -> anyhow::Result<u8> {
    let policy = select.load()?;
    let question = match query {
        Query::Net { target, resolved } => Question::Net { target, resolved },
        Query::Fs { path, access } => Question::Fs {
            path,
            access: match access {
                AccessArg::Read => Access::Read,
                AccessArg::Write => Access::Write,
            },
        },
        Query::Mcp { call, args } => Question::Mcp { call, args },
        Query::Credential { secret, host } => Question::Credential { secret, host },
        Query::Exec { command } => Question::Exec { command },
        Query::Limits { vcpus, memory_mib } => Question::Limits { vcpus, memory_mib },
    };
    let Answer {
        surface,
        request,
        decision: d,
    } = policy.explain(&question)?;
    if json {
        let v = serde_json::json!({
            "decision": d.outcome(),
            "allowed": d.allowed(),
            "surface": surface,
            "request": request,
            "rule": d.rule,
            "reason": d.reason,
            "matched": d.matched,
        });
        println!("{v}");
    } else {
        print_decision(surface, &request, &d);
    }
    Ok(if d.allowed() { 0 } else { EXIT_DENY })
}

fn rule_line(r: &RuleInfo) -> String {
    format!(
        "{:<6} {:<24} {:<8} {:<28} {}",
        r.action.as_str(),
        r.id,
        r.layer.as_str(),
        r.location.to_string(),
        r.summary
    )
}

fn print_decision(surface: Surface, request: &str, d: &Decision<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}: {surface} {request}", d.outcome());
    let _ = writeln!(
        out,
        "  rule:   {} ({} layer, {}, {})",
        d.rule.id,
        d.rule.layer,
        d.rule.location,
        d.mode().as_str()
    );
    let _ = writeln!(out, "  reason: {}", d.reason);
    if !d.matched.is_empty() {
        let _ = writeln!(out, "  rules that matched, most senior first:");
        for r in &d.matched {
            let _ = writeln!(out, "    {}", rule_line(r));
        }
    }
}

fn show(select: &Select, json: bool) -> anyhow::Result<u8> {
    let p = select.load()?;
    if json {
        let v = serde_json::json!({
            "preset": p.preset_name(),
            "sources": p.sources(),
            "delegation": p.delegation(),
            "mounts": p.mounts(),
            "limits": p.limits(),
            "rules": p.rules(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    // Bundles a control plane serves: said so, with the server and version.
    let managed_dir = Locations::here().managed();
    let server = sandbox::managed::current().ok().flatten();
    writeln!(out, "Sources, most senior first:")?;
    for s in p.sources() {
        let mut signed = s
            .signed_by
            .as_ref()
            .map(|k| format!(" (signed by {k})"))
            .unwrap_or_default();
        if let (true, Some(l)) = (Path::new(&s.name).starts_with(&managed_dir), &server) {
            signed.push_str(&format!(" managed by {}", l.url));
        }
        writeln!(
            out,
            "  {:<8} {:<8} {}{signed}",
            s.layer.as_str(),
            s.mode.as_str(),
            s.name
        )?;
    }
    let d = p.delegation();
    if d.team.is_some() || d.local.is_some() {
        writeln!(
            out,
            "Delegated by the org (allow rules lower layers may add):"
        )?;
        for (who, grant) in [("team", &d.team), ("local", &d.local)] {
            let kinds = match grant {
                None => "anything".to_string(),
                Some(g) if g.kinds.is_empty() => format!("nothing  [{}]", g.location),
                Some(g) => format!("{}  [{}]", g.kinds.join(", "), g.location),
            };
            writeln!(out, "  {who:<8} {kinds}")?;
        }
    }
    writeln!(out, "Mounts:")?;
    let mounts = p.mounts();
    if mounts.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for m in mounts {
        let mode = if m.read_only {
            "read-only"
        } else {
            "read-write"
        };
        writeln!(
            out,
            "  {} <- {} {mode}  [{} {} {}]",
            m.guest,
            m.host.display(),
            m.rule.id,
            m.rule.layer,
            m.rule.location
        )?;
    }
    writeln!(out, "Limits:")?;
    let l = p.limits();
    let limits = [
        ("vcpus", &l.vcpus),
        ("memory_mib", &l.memory_mib),
        ("disk_mib", &l.disk_mib),
        ("lifetime_secs", &l.lifetime_secs),
    ];
    if limits.iter().all(|(_, v)| v.is_none()) {
        writeln!(out, "  (none)")?;
    }
    for (name, v) in limits {
        if let Some(v) = v {
            writeln!(
                out,
                "  {name} = {}  [{} {}]",
                v.value, v.rule.layer, v.rule.location
            )?;
        }
    }
    writeln!(
        out,
        "Rules (an enforced deny wins; what no rule allows is denied):"
    )?;
    for s in Surface::ALL {
        let rules: Vec<&RuleInfo> = p
            .rules()
            .iter()
            .filter(|r| r.surface == s && s != Surface::Limits)
            .collect();
        if rules.is_empty() {
            continue;
        }
        writeln!(out, "  {s}:")?;
        for r in rules {
            let mode = if r.mode == sbx_policy::Mode::Audit {
                " (audit)"
            } else {
                ""
            };
            writeln!(out, "    {}{mode}", rule_line(r))?;
        }
    }
    Ok(0)
}

fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {} (sbx never overwrites a key)",
                path.display()
            )
        })?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn with_ext(p: &Path, ext: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

fn keygen(prefix: &Path) -> anyhow::Result<u8> {
    let key = sbx_policy::generate_key()?;
    let (secret, public) = (with_ext(prefix, ".key"), with_ext(prefix, ".pub"));
    write_new(&secret, &sbx_policy::encode_secret_key(&key), 0o600)?;
    write_new(
        &public,
        &sbx_policy::encode_public_key(&key.verifying_key()),
        0o644,
    )?;
    println!(
        "key {}: secret in {}, public in {}",
        sbx_policy::key_id(&key.verifying_key()),
        secret.display(),
        public.display()
    );
    println!("Machines that should accept bundles signed with it need the public key in /etc/sbx/trusted-keys/.");
    Ok(0)
}

fn sign(key: &Path, file: &Path, out: Option<PathBuf>) -> anyhow::Result<u8> {
    let secret = std::fs::read_to_string(key)
        .with_context(|| format!("cannot read key {}", key.display()))?;
    let key = sbx_policy::decode_secret_key(&secret).with_context(|| key.display().to_string())?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if sbx_policy::is_bundle(&text) {
        bail!("{} is already a signed bundle", file.display());
    }
    // Refuse to sign what would not load.
    let mut b = PolicyBuilder::new();
    b.add_text(&file.display().to_string(), &text)?;
    b.build()?;
    let out = out.unwrap_or_else(|| file.with_extension("bundle"));
    std::fs::write(&out, sbx_policy::sign(&text, &key))
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "signed {} with key {} -> {}",
        file.display(),
        sbx_policy::key_id(&key.verifying_key()),
        out.display()
    );
    Ok(0)
}
