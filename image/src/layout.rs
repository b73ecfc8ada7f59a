//! Writing an image as an OCI image layout archive (what `sbx image
//! import` reads and `skopeo copy oci-archive:…` pushes): used to build
//! the base image and to save templates' layers.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use flate2::write::GzEncoder;

use crate::digest::{Digest, Hashing};
use crate::error::{At, Result};
use crate::manifest::{Config, Descriptor, Index, Manifest, RootFs, RunConfig, MANIFEST_TYPES};

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// Writes an OCI layout archive at `out` holding one linux/amd64 image
/// named `name`, made of `layers` (uncompressed tar files, lowest first)
/// and run with `run`. `scratch` holds the compressed layers meanwhile.
pub fn write_archive(
    out: &Path,
    name: &str,
    layers: &[&Path],
    run: RunConfig,
    scratch: &Path,
) -> Result<Digest> {
    std::fs::create_dir_all(scratch).at(|| format!("cannot create {}", scratch.display()))?;
    let mut blobs: Vec<(Digest, Vec<u8>)> = Vec::new();
    let mut layer_files = Vec::new();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let gz_path = scratch.join(format!("layer-{i}.tar.gz"));
        let (digest, size, diff_id) = compress_layer(layer, &gz_path)?;
        descs.push(descriptor(LAYER_TYPE, &digest, size));
        diff_ids.push(diff_id);
        layer_files.push((digest, gz_path));
    }
    let config = Config {
        architecture: "amd64".into(),
        os: "linux".into(),
        config: run,
        rootfs: RootFs { diff_ids },
    };
    let mut config_json = serde_json::to_value(&config).unwrap_or_default();
    config_json["rootfs"]["type"] = "layers".into();
    let config_bytes = serde_json::to_vec(&config_json).unwrap_or_default();
    let config_digest = Digest::of(&config_bytes);
    let manifest = Manifest {
        media_type: Some(MANIFEST_TYPES[0].into()),
        config: descriptor(CONFIG_TYPE, &config_digest, config_bytes.len() as u64),
        layers: descs,
    };
    let mut manifest_json = serde_json::to_value(&manifest).unwrap_or_default();
    manifest_json["schemaVersion"] = 2.into();
    let manifest_bytes = serde_json::to_vec(&manifest_json).unwrap_or_default();
    let manifest_digest = Digest::of(&manifest_bytes);
    let mut top = descriptor(
        MANIFEST_TYPES[0],
        &manifest_digest,
        manifest_bytes.len() as u64,
    );
    top.annotations
        .insert("org.opencontainers.image.ref.name".into(), name.into());
    let index = Index {
        media_type: Some("application/vnd.oci.image.index.v1+json".into()),
        manifests: vec![top],
    };
    let mut index_json = serde_json::to_value(&index).unwrap_or_default();
    index_json["schemaVersion"] = 2.into();
    blobs.push((config_digest, config_bytes));
    blobs.push((manifest_digest.clone(), manifest_bytes));

    let tmp = out.with_extension("partial");
    let file = File::create(&tmp).at(|| format!("cannot create {}", tmp.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    fn add<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8]) -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, path, bytes)
    }
    let wrote = (|| {
        add(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let index_bytes = serde_json::to_vec(&index_json).unwrap_or_default();
        add(&mut tar, "index.json", &index_bytes)?;
        for (d, bytes) in &blobs {
            add(&mut tar, &format!("blobs/sha256/{}", d.hex()), bytes)?;
        }
        for (d, path) in &layer_files {
            tar.append_path_with_name(path, format!("blobs/sha256/{}", d.hex()))?;
        }
        tar.into_inner()?.flush()
    })();
    wrote.at(|| format!("cannot write {}", tmp.display()))?;
    for (_, path) in &layer_files {
        let _ = std::fs::remove_file(path);
    }
    std::fs::rename(&tmp, out).at(|| format!("cannot write {}", out.display()))?;
    Ok(manifest_digest)
}

/// Gzips the layer tar at `input` into `out`; returns the compressed
/// blob's digest and size, and the uncompressed tar's digest (its diff_id).
fn compress_layer(input: &Path, out: &Path) -> Result<(Digest, u64, Digest)> {
    let mut src =
        Hashing::new(File::open(input).at(|| format!("cannot open {}", input.display()))?);
    let gz = File::create(out).at(|| format!("cannot create {}", out.display()))?;
    let mut enc = Hashing::new(GzEncoder::new(gz, flate2::Compression::fast()));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src
            .read(&mut buf)
            .at(|| format!("cannot read {}", input.display()))?;
        if n == 0 {
            break;
        }
        enc.write_all(&buf[..n])
            .at(|| format!("cannot write {}", out.display()))?;
    }
    let (_, diff_id) = src.finish();
    let (enc, _) = enc.finish();
    enc.finish()
        .at(|| format!("cannot write {}", out.display()))?;
    let (digest, size) = hash_file(out)?;
    Ok((digest, size, diff_id))
}

pub(crate) fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: digest.clone(),
        size,
        platform: None,
        annotations: Default::default(),
    }
}

fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    let mut h = Hashing::new(File::open(path).at(|| format!("cannot open {}", path.display()))?);
    std::io::copy(&mut h, &mut std::io::sink()).at(|| format!("cannot read {}", path.display()))?;
    let size = h.count();
    Ok((h.finish().1, size))
}
