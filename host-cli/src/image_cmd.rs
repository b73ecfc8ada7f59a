//! `sbx image`: the guest images sessions boot from (`--image`).

use std::path::PathBuf;

use anyhow::Context;
use sbx_image::store::human;
use sbx_image::{archive, ImageRecord};

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx image import base.tar               an OCI layout or `docker save` tarball
  sbx image pull localhost:5000/tools:1   from a registry
  sbx image ls
  sbx run --image base -- python3 --version

Each image becomes one read-only file system, shared by every session that
boots from it; a session's writes go to its own disk (`--disk`).")]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Pull an image from a registry (credentials from `docker login`'s file;
    /// registries on the loopback are spoken to over plain HTTP).
    Pull(PullArgs),
    /// Import an image from a tarball (OCI image layout, or `docker save`; may be gzipped).
    Import(ImportArgs),
    /// List images: name, digest, size, source.
    Ls(JsonArg),
    /// Show one image's record (digest, layers, environment).
    Inspect(NameArgs),
    /// Remove images (refused while a session runs from one).
    Rm(RmArgs),
}

#[derive(clap::Args)]
struct PullArgs {
    /// REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]; a digest pins the image.
    reference: String,
    /// Name to give the image (default: the reference).
    #[arg(long)]
    name: Option<String>,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The tarball.
    file: PathBuf,
    /// Name to give the image (default: the name the archive carries).
    #[arg(long)]
    name: Option<String>,
}

#[derive(clap::Args)]
struct JsonArg {
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct NameArgs {
    name: String,
}

#[derive(clap::Args)]
struct RmArgs {
    #[arg(required = true)]
    names: Vec<String>,
}

pub fn progress(line: &str) {
    eprintln!("sbx: {line}");
}

/// Says what was added (stderr) and prints its name (stdout, for scripts).
fn added(how: &str, rec: &ImageRecord, started: std::time::Instant) {
    eprintln!(
        "sbx: {how} {} ({}, {:.1} s)",
        rec.name,
        rec.digest,
        started.elapsed().as_secs_f64()
    );
    println!("{}", rec.name);
}

pub fn run(a: Args) -> anyhow::Result<u8> {
    let store = sandbox::disks::image_store()?;
    match a.command {
        Cmd::Pull(p) => {
            let started = std::time::Instant::now();
            let rec = sbx_image::pull::pull(&store, &p.reference, p.name.as_deref(), &progress)?;
            added("pulled", &rec, started);
        }
        Cmd::Import(i) => {
            let started = std::time::Instant::now();
            let rec = archive::import(&store, &i.file, i.name.as_deref(), &progress)
                .with_context(|| format!("cannot import {}", i.file.display()))?;
            added("imported", &rec, started);
        }
        Cmd::Ls(o) => {
            let images = store.list()?;
            if o.json {
                println!("{}", serde_json::to_string_pretty(&images)?);
                return Ok(0);
            }
            println!("{:<32} {:<19} {:>10}  SOURCE", "NAME", "DIGEST", "SIZE");
            for i in &images {
                println!(
                    "{:<32} {:<19} {:>10}  {}",
                    i.name,
                    sbx_image::store::short(&i.digest),
                    human(i.root_size),
                    i.source
                );
            }
        }
        Cmd::Inspect(n) => {
            let rec: ImageRecord = store.find(&n.name)?;
            let mut v = serde_json::to_value(&rec)?;
            let roots: Vec<String> = store
                .root_paths(&rec)
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            // The disks the root is made of, topmost first.
            v["roots"] = roots.into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Cmd::Rm(r) => {
            for name in &r.names {
                let rec = store.remove(name)?;
                eprintln!("sbx: removed image {} ({})", rec.name, rec.digest);
            }
        }
    }
    Ok(0)
}
