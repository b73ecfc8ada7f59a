//! Pulling from an OCI registry (the `oci-client` crate): the manifest
//! (through a multi-platform index to its linux/amd64 manifest), the
//! config and each layer not already stored, every one checked against
//! its digest before it is kept. Credentials come from the user's own
//! registry login files; registries on the loopback are spoken to over
//! plain HTTP, as Docker does.

use std::path::PathBuf;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::digest::Digest;
use crate::error::{At, ImageError, Result};
use crate::manifest::{Document, Manifest, INDEX_TYPES, MANIFEST_TYPES};
use crate::store::{human, short, ImageRecord, Progress, Store};

/// Pulls `reference` (`registry/repository[:tag][@sha256:…]`) into `store`,
/// recorded as `name` (default: the reference as given).
pub fn pull(
    store: &Store,
    reference: &str,
    name: Option<&str>,
    progress: Progress<'_>,
) -> Result<ImageRecord> {
    let image: Reference = reference.parse().map_err(|e| {
        ImageError::Registry(format!(
            "`{reference}` is not an image reference (REGISTRY/REPOSITORY[:TAG][@sha256:…]): {e}"
        ))
    })?;
    let pin = image.digest().map(Digest::parse).transpose()?;
    let registry = image.resolve_registry().to_string();
    let client = Client::new(ClientConfig {
        protocol: if is_loopback(&registry) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..ClientConfig::default()
    });
    let auth = credentials(&registry);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .at(|| "cannot start the registry client".into())?;
    let shown = reference.to_string();
    let fail = |what: &str, e: oci_client::errors::OciDistributionError| {
        ImageError::Registry(format!(
            "cannot pull {shown}: {}",
            explain(what, &registry, &e)
        ))
    };

    progress(&format!("pulling {shown} from {registry}"));
    let accepted: Vec<&str> = INDEX_TYPES.iter().chain(&MANIFEST_TYPES).copied().collect();
    let (bytes, _) = runtime
        .block_on(client.pull_manifest_raw(&image, &auth, &accepted))
        .map_err(|e| fail("its manifest", e))?;
    let mut digest = Digest::of(&bytes);
    if let Some(p) = &pin {
        p.verify(&digest)?;
    }
    let mut doc = Document::parse(&bytes, &format!("the manifest of {shown}"))?;
    let mut raw = bytes.to_vec();
    if let Document::Index(index) = &doc {
        let chosen = index.pick(&shown)?.digest.clone();
        let by_digest = image.clone_with_digest(chosen.to_string());
        let (bytes, _) = runtime
            .block_on(client.pull_manifest_raw(&by_digest, &auth, &MANIFEST_TYPES))
            .map_err(|e| fail("its linux/amd64 manifest", e))?;
        chosen.verify(&Digest::of(&bytes))?;
        digest = chosen;
        raw = bytes.to_vec();
        doc = Document::parse(&raw, &format!("manifest {digest}"))?;
    }
    let Document::Manifest(manifest) = doc else {
        return Err(ImageError::Malformed(format!(
            "{shown}: an index inside an index, which sbx does not follow"
        )));
    };
    store.put_blob(&mut &raw[..], Some(&digest))?;
    fetch_blobs(store, &runtime, &client, &image, &manifest, progress).map_err(|e| match e {
        ImageError::Registry(m) => ImageError::Registry(format!("cannot pull {shown}: {m}")),
        e => e,
    })?;
    let name = name.map_or_else(|| reference.to_string(), str::to_string);
    store.install(
        &name,
        &digest,
        &manifest,
        &format!("pulled from {shown}"),
        progress,
    )
}

/// The config and every layer not stored yet, each checked on arrival.
fn fetch_blobs(
    store: &Store,
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    image: &Reference,
    manifest: &Manifest,
    progress: Progress<'_>,
) -> Result<()> {
    let n = manifest.layers.len();
    let blobs = std::iter::once((None, &manifest.config)).chain(
        manifest
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| (Some(i), l)),
    );
    for (i, desc) in blobs {
        if store.has_blob(&desc.digest) {
            continue;
        }
        if let Some(i) = i {
            progress(&format!(
                "pulling layer {}/{n} ({}, {})",
                i + 1,
                short(&desc.digest),
                human(desc.size)
            ));
        }
        let tmp: PathBuf = store.tmp("pull");
        let result = (|| {
            let file = runtime
                .block_on(tokio::fs::File::create(&tmp))
                .at(|| format!("cannot create {}", tmp.display()))?;
            runtime
                .block_on(client.pull_blob(image, desc.digest.as_str(), file))
                .map_err(|e| {
                    let text = one_line(&e.to_string());
                    if text.to_lowercase().contains("digest") {
                        // The client checks as it downloads; say it as sbx does.
                        let actual = text
                            .split_whitespace()
                            .filter_map(|w| {
                                Digest::parse(
                                    w.trim_matches(|c: char| {
                                        !c.is_ascii_alphanumeric() && c != ':'
                                    }),
                                )
                                .ok()
                            })
                            .find(|d| d != &desc.digest)
                            .map_or_else(|| format!("something else ({text})"), |d| d.to_string());
                        ImageError::Digest {
                            expected: desc.digest.to_string(),
                            actual,
                        }
                    } else {
                        ImageError::Registry(format!("blob {}: {text}", desc.digest))
                    }
                })?;
            let mut file =
                std::fs::File::open(&tmp).at(|| format!("cannot read {}", tmp.display()))?;
            store.put_blob(&mut file, Some(&desc.digest))
        })();
        let _ = std::fs::remove_file(&tmp);
        result?;
    }
    Ok(())
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(registry, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The user's login for `registry` from Docker's or Podman's credentials
/// file (`auths.<registry>.auth`, base64 of `user:password`); anonymous
/// when there is none. Credential helpers are not consulted.
fn credentials(registry: &str) -> RegistryAuth {
    use base64::Engine as _;
    let mut files = Vec::new();
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        files.push(PathBuf::from(d).join("config.json"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        files.push(PathBuf::from(h).join(".docker/config.json"));
    }
    if let Some(r) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(r).join("containers/auth.json"));
    }
    for f in files {
        let Ok(text) = std::fs::read(&f) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
            tracing::warn!(file = %f.display(), "registry credentials file is not JSON; ignored");
            continue;
        };
        let auths = &v["auths"];
        let entry = [registry.to_string(), format!("https://{registry}")]
            .iter()
            .find_map(|k| auths.get(k).and_then(|e| e["auth"].as_str()))
            .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok())
            .and_then(|b| String::from_utf8(b).ok());
        if let Some((user, pass)) = entry.as_deref().and_then(|s| s.split_once(':')) {
            return RegistryAuth::Basic(user.to_string(), pass.to_string());
        }
    }
    RegistryAuth::Anonymous
}

/// What went wrong talking to the registry, in the terms a person acts on.
fn explain(what: &str, registry: &str, e: &oci_client::errors::OciDistributionError) -> String {
    use oci_client::errors::OciDistributionError as E;
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    let chain = one_line(&chain);
    let lower = chain.to_lowercase();
    if matches!(e, E::ImageManifestNotFoundError(_))
        || lower.contains("manifest unknown")
        || lower.contains("name unknown")
    {
        format!("the registry {registry} has no such image or tag ({what}: {chain})")
    } else if matches!(e, E::AuthenticationFailure(_) | E::UnauthorizedError { .. })
        || lower.contains("unauthorized")
        || lower.contains("denied")
    {
        format!("the registry {registry} refused access; log in with `docker login {registry}` ({chain})")
    } else if lower.contains("error sending request") || lower.contains("connect") {
        format!("cannot reach the registry {registry}; is the address right and the registry up? ({chain})")
    } else {
        format!("{what}: {chain}")
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["registry.example:5000", "10.0.0.1:5000", "docker.io"] {
            assert!(!is_loopback(r), "{r}");
        }
    }
}
