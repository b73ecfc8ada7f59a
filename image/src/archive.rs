//! Importing an image from a tarball: an OCI image layout (`index.json`,
//! `blobs/sha256/…`, as `skopeo copy … oci-archive:` writes) or a
//! `docker save` archive (`manifest.json` with layer paths). Either may be
//! gzip-compressed. Every file is hashed as it is stored; a blob whose
//! name is its digest must match it.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{malformed, At, ImageError, Result};
use crate::manifest::{Descriptor, Document, Manifest, MANIFEST_TYPES};
use crate::store::{count, human, ImageRecord, Progress, Store};

/// The small JSON files an archive describes itself with.
const META_FILES: [&str; 4] = ["index.json", "oci-layout", "manifest.json", "repositories"];
const META_MAX: u64 = 16 << 20;
/// Annotations that carry an image's name in an OCI layout.
const NAME_ANNOTATIONS: [&str; 2] = [
    "io.containerd.image.name",
    "org.opencontainers.image.ref.name",
];

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Imports the image in the tarball at `path`, named `name` or by the
/// name the archive gives it.
pub fn import(
    store: &Store,
    path: &Path,
    name: Option<&str>,
    progress: Progress<'_>,
) -> Result<ImageRecord> {
    let shown = path.display();
    let mut file = File::open(path).at(|| format!("cannot open {shown}"))?;
    let mut magic = [0u8; 2];
    let n = file
        .read(&mut magic)
        .at(|| format!("cannot read {shown}"))?;
    let stream = std::io::Cursor::new(magic[..n].to_vec()).chain(file);
    let stream: Box<dyn Read> = if magic == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(stream))
    } else {
        Box::new(stream)
    };
    progress(&format!("reading {shown}"));
    let mut archive = tar::Archive::new(stream);
    let mut meta: HashMap<String, Vec<u8>> = HashMap::new();
    let mut by_path: HashMap<String, (Digest, u64)> = HashMap::new();
    let bad = |e: std::io::Error| {
        ImageError::Malformed(format!(
            "{shown} is not a readable image archive (a tar file from `docker save` or `skopeo copy … oci-archive:`): {e}"
        ))
    };
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let p = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let p = p.trim_start_matches("./").to_string();
        if META_FILES.contains(&p.as_str()) {
            let mut buf = Vec::new();
            (&mut entry)
                .take(META_MAX)
                .read_to_end(&mut buf)
                .map_err(bad)?;
            meta.insert(p, buf);
            continue;
        }
        // `blobs/sha256/<hex>` names its digest: it must match.
        let expected = p
            .strip_prefix("blobs/sha256/")
            .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok());
        let stored = store
            .put_blob(&mut entry, expected.as_ref())
            .map_err(|e| match e {
                ImageError::Io { source, .. } => bad(source),
                e => e,
            })?;
        by_path.insert(p, stored);
    }

    let source = format!("imported from {shown}");
    if let Some(index) = meta.get("index.json") {
        let (desc, found_name) = from_layout(store, index, &shown.to_string())?;
        let name = pick_name(name, found_name, &shown.to_string())?;
        let bytes = store.read_blob(&desc.digest)?;
        let Document::Manifest(manifest) =
            Document::parse(&bytes, &format!("manifest {}", desc.digest))?
        else {
            malformed!(
                "{shown}: manifest {} is an index inside an index, which sbx does not follow",
                desc.digest
            );
        };
        check_present(store, &manifest, &shown.to_string())?;
        progress(&format!(
            "importing {name} ({})",
            count(manifest.layers.len(), "layer")
        ));
        return store.install(&name, &desc.digest, &manifest, &source, progress);
    }
    if let Some(docker) = meta.get("manifest.json") {
        let entries: Vec<DockerEntry> = serde_json::from_slice(docker).map_err(|e| {
            ImageError::Malformed(format!(
                "{shown}: manifest.json is not a docker save manifest: {e}"
            ))
        })?;
        let Some(first) = entries.into_iter().next() else {
            malformed!("{shown}: manifest.json lists no images");
        };
        let found_name = first.repo_tags.as_ref().and_then(|t| t.first().cloned());
        let name = pick_name(name, found_name, &shown.to_string())?;
        let blob = |p: &str| -> Result<Descriptor> {
            let Some((digest, size)) = by_path.get(p.trim_start_matches("./")) else {
                malformed!("{shown}: manifest.json names {p}, which the archive does not hold");
            };
            Ok(Descriptor {
                media_type: String::new(),
                digest: digest.clone(),
                size: *size,
                platform: None,
                annotations: Default::default(),
            })
        };
        let manifest = Manifest {
            media_type: Some(MANIFEST_TYPES[0].into()),
            config: blob(&first.config)?,
            layers: first
                .layers
                .iter()
                .map(|l| blob(l))
                .collect::<Result<_>>()?,
        };
        // The manifest sbx records is its own rendering of docker's list.
        let bytes = serde_json::to_vec(&manifest).unwrap_or_default();
        let (digest, _) = store.put_blob(&mut &bytes[..], None)?;
        let total: u64 = manifest.layers.iter().map(|l| l.size).sum();
        progress(&format!(
            "importing {name} ({}, {})",
            count(manifest.layers.len(), "layer"),
            human(total)
        ));
        return store.install(&name, &digest, &manifest, &source, progress);
    }
    malformed!("{shown} is neither an OCI image layout (no index.json) nor a `docker save` archive (no manifest.json)")
}

/// The manifest an OCI layout's index points at (through a
/// multi-platform index when there is one), and the name it gives.
fn from_layout(store: &Store, index: &[u8], shown: &str) -> Result<(Descriptor, Option<String>)> {
    let Document::Index(index) = Document::parse(index, &format!("{shown}: index.json"))? else {
        malformed!("{shown}: index.json is not an index");
    };
    let Some(top) = index.manifests.first() else {
        malformed!("{shown}: index.json lists no images");
    };
    let name = NAME_ANNOTATIONS
        .iter()
        .find_map(|a| top.annotations.get(*a).cloned());
    if index.manifests.len() > 1 {
        return Ok((index.pick(shown)?.clone(), name));
    }
    if !store.has_blob(&top.digest) {
        malformed!(
            "{shown}: the archive lacks blob {}, which its index names",
            top.digest
        );
    }
    match Document::parse(
        &store.read_blob(&top.digest)?,
        &format!("blob {}", top.digest),
    )? {
        Document::Manifest(_) => Ok((top.clone(), name)),
        Document::Index(inner) => Ok((inner.pick(shown)?.clone(), name)),
    }
}

fn check_present(store: &Store, manifest: &Manifest, shown: &str) -> Result<()> {
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        if !store.has_blob(&d.digest) {
            malformed!(
                "{shown}: the archive lacks blob {}, which its manifest names",
                d.digest
            );
        }
    }
    Ok(())
}

fn pick_name(given: Option<&str>, found: Option<String>, shown: &str) -> Result<String> {
    match (given, found) {
        (Some(n), _) => Ok(n.to_string()),
        (None, Some(n)) => Ok(n),
        (None, None) => malformed!("{shown} does not name its image; give it one with --name"),
    }
}
