//! The OCI documents an image is made of (index, manifest, config), as
//! far as sbx reads them, and picking the linux/amd64 image from an index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{malformed, ImageError, Result};

pub const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
pub const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    fn is_ours(&self) -> bool {
        self.os == "linux" && self.architecture == "amd64"
    }
}

/// An index (or Docker manifest list): manifests by platform.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

impl Index {
    /// The linux/amd64 manifest; `name` is for the error.
    pub fn pick(&self, name: &str) -> Result<&Descriptor> {
        let ours = self.manifests.iter().find(|d| {
            d.platform.as_ref().is_some_and(Platform::is_ours)
                || (d.platform.is_none() && self.manifests.len() == 1)
        });
        if let Some(d) = ours {
            return Ok(d);
        }
        let found: Vec<String> = self
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(|p| format!("{}/{}", p.os, p.architecture))
            .collect();
        if found.is_empty() {
            malformed!("image {name}: its index lists no manifests with a platform");
        }
        Err(ImageError::Platform {
            name: name.into(),
            found: found.join(", "),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What a document is, by its media type or, failing that, its shape.
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

impl Document {
    pub fn parse(bytes: &[u8], what: &str) -> Result<Document> {
        let v: serde_json::Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => malformed!("{what} is not JSON: {e}"),
        };
        let doc = if v.get("manifests").is_some() {
            serde_json::from_value(v).map(Document::Index)
        } else {
            serde_json::from_value(v).map(Document::Manifest)
        };
        doc.map_err(|e| {
            ImageError::Malformed(format!("{what} is not an OCI index or manifest: {e}"))
        })
    }
}

/// The image configuration, as far as sbx uses it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: RunConfig,
    #[serde(default)]
    pub rootfs: RootFs,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl Config {
    pub fn parse(bytes: &[u8], name: &str) -> Result<Config> {
        let config: Config = serde_json::from_slice(bytes).map_err(|e| {
            ImageError::Malformed(format!("image {name}: its config is not valid: {e}"))
        })?;
        if config.os != "linux" || config.architecture != "amd64" {
            return Err(ImageError::Platform {
                name: name.into(),
                found: format!("{}/{}", config.os, config.architecture),
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(arch: &str) -> Descriptor {
        Descriptor {
            media_type: MANIFEST_TYPES[0].into(),
            digest: Digest::of(arch.as_bytes()),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: None,
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn an_index_gives_its_amd64_manifest_or_names_what_it_has() {
        let index = Index {
            media_type: None,
            manifests: vec![desc("arm64"), desc("amd64")],
        };
        assert_eq!(index.pick("x").unwrap().digest, Digest::of(b"amd64"));
        let arm = Index {
            media_type: None,
            manifests: vec![desc("arm64"), desc("riscv64")],
        };
        let e = arm.pick("x").unwrap_err().to_string();
        assert!(e.contains("linux/arm64, linux/riscv64"), "{e}");
        let cfg = br#"{"architecture":"arm64","os":"linux"}"#;
        assert!(matches!(
            Config::parse(cfg, "x"),
            Err(ImageError::Platform { .. })
        ));
    }
}
