//! Which policy applies: the files named explicitly, or else the ones
//! found where each layer keeps its own (the organisation's signed bundle
//! or file in the system directory, the user's team file, the project's
//! file), the preset they build on, and the keys trusted to sign bundles.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{PolicyBuilder, PolicyError};

/// `$<over>` if set, else `$<xdg>/sbx`, else `~/<fallback>/sbx`.
pub fn xdg_dir(over: &str, xdg: &str, fallback: &str) -> PathBuf {
    if let Some(d) = std::env::var_os(over) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os(xdg).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(fallback)
    });
    base.join("sbx")
}

/// Where each layer's file is looked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locations {
    /// Machine-wide, where an organisation puts its signed policy and
    /// trusted keys: `$SBX_SYSTEM_DIR`, else `/etc/sbx`.
    pub system: PathBuf,
    /// The user's (team) policy: `$SBX_CONFIG_DIR`, else
    /// `$XDG_CONFIG_HOME/sbx`, else `~/.config/sbx`.
    pub config: PathBuf,
    /// The project whose `.sbx/policy.toml` applies (the working directory).
    pub project: PathBuf,
}

impl Locations {
    /// From the environment, with `project` as the project directory.
    pub fn from_env(project: &Path) -> Locations {
        Locations {
            system: std::env::var_os("SBX_SYSTEM_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/etc/sbx")),
            config: xdg_dir("SBX_CONFIG_DIR", "XDG_CONFIG_HOME", ".config"),
            project: project.to_path_buf(),
        }
    }

    /// As [`Locations::from_env`], for the current directory; a project
    /// file is then looked for relative to wherever the process runs.
    pub fn here() -> Locations {
        Locations::from_env(Path::new(""))
    }

    /// Where the bundles a control plane serves this machine are kept
    /// (`sbx login`): `org-v<N>.bundle`, `team-<name>-v<N>.bundle`, and the
    /// organisation's key pinned at login, `org.pub`.
    pub fn managed(&self) -> PathBuf {
        self.config.join("managed")
    }

    /// The control plane's bundles of kind `prefix` (`org-`, `team-`).
    fn managed_bundles(&self, prefix: &str) -> Vec<PathBuf> {
        let Ok(dir) = std::fs::read_dir(self.managed()) else {
            return Vec::new();
        };
        let mut found: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "bundle")
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
            })
            .collect();
        found.sort();
        found
    }

    /// The layers' files that exist, most senior first: the system's org
    /// policy, the control plane's org bundle, the user's team file, the
    /// control plane's team bundle, the project's file.
    pub fn found(&self) -> Vec<PathBuf> {
        let org = [
            self.system.join("policy.bundle"),
            self.system.join("policy.toml"),
        ]
        .into_iter()
        .find(|p| p.exists());
        let team = Some(self.config.join("policy.toml")).filter(|p| p.exists());
        let project = Some(self.project.join(".sbx/policy.toml")).filter(|p| p.exists());
        let mut out: Vec<PathBuf> = org.into_iter().collect();
        out.extend(self.managed_bundles("org-"));
        out.extend(team);
        out.extend(self.managed_bundles("team-"));
        out.extend(project);
        out
    }

    /// The keys in `<system>/trusted-keys/*.pub`, sorted, and the key
    /// pinned at `sbx login`.
    fn system_keys(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(self.system.join("trusted-keys"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pub"))
            .collect();
        found.sort();
        found.extend(Some(self.managed().join("org.pub")).filter(|p| p.exists()));
        found
    }
}

/// What a person or program asked for; empty means "what sbx finds".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// Policy files or signed bundles in layer order; when empty, the
    /// files found at the [`Locations`].
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// The preset the files build on (locked-down when None).
    #[serde(default)]
    pub preset: Option<String>,
    /// Public keys to trust for signed bundles, besides the system's.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// Rule sets given as text (name, text) on top of the files: what an
    /// agent template needs (its API host, its credential). Named in
    /// errors and audit records by their name.
    #[serde(default)]
    pub texts: Vec<(String, String)>,
}

impl Selection {
    /// The files to load, most senior first.
    pub fn files(&self, at: &Locations) -> Vec<PathBuf> {
        if self.files.is_empty() {
            at.found()
        } else {
            self.files.clone()
        }
    }

    /// The same selection with relative paths made relative to `dir`, so it
    /// means the same in a process that runs elsewhere.
    pub fn anchored(&self, dir: &Path) -> Selection {
        let anchor = |p: &PathBuf| dir.join(p);
        Selection {
            files: self.files.iter().map(anchor).collect(),
            preset: self.preset.clone(),
            trusted_keys: self.trusted_keys.iter().map(anchor).collect(),
            texts: self.texts.clone(),
        }
    }

    fn trusted_keys(&self, at: &Locations) -> Result<Vec<crate::VerifyingKey>, PolicyError> {
        let mut files = self.trusted_keys.clone();
        files.extend(at.system_keys());
        files
            .into_iter()
            .map(|path| {
                let text = match std::fs::read_to_string(&path) {
                    Ok(t) => t,
                    Err(error) => return Err(PolicyError::KeyRead { path, error }),
                };
                crate::decode_public_key(&text).map_err(|error| PolicyError::Key { path, error })
            })
            .collect()
    }

    /// Loads the policy this selection names.
    pub fn load(&self, at: &Locations) -> Result<crate::Policy, PolicyError> {
        self.load_files(&self.files(at), at)
    }

    /// Loads `files` with this selection's preset and keys.
    pub fn load_files(
        &self,
        files: &[PathBuf],
        at: &Locations,
    ) -> Result<crate::Policy, PolicyError> {
        let mut b = PolicyBuilder::new();
        for k in self.trusted_keys(at)? {
            b.trust(k);
        }
        if let Some(p) = &self.preset {
            b.preset(p)?;
        }
        for f in files {
            b.add_file(f)?;
        }
        for (name, text) in &self.texts {
            b.add_text(name, text)?;
        }
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layer_is_found_in_its_place_unless_files_are_named() {
        let tmp = std::env::temp_dir().join(format!("sbx-discovery-{}", std::process::id()));
        let at = Locations {
            system: tmp.join("etc"),
            config: tmp.join("config"),
            project: tmp.join("project"),
        };
        for d in [&at.system, &at.config, &at.project.join(".sbx")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(at.system.join("policy.toml"), "").unwrap();
        std::fs::write(at.project.join(".sbx/policy.toml"), "").unwrap();
        let found = Selection::default().files(&at);
        assert_eq!(
            found,
            [
                at.system.join("policy.toml"),
                at.project.join(".sbx/policy.toml")
            ]
        );
        // A signed bundle stands for the organisation before a plain file.
        std::fs::write(at.system.join("policy.bundle"), "").unwrap();
        assert_eq!(
            Selection::default().files(&at)[0],
            at.system.join("policy.bundle")
        );
        let named = Selection {
            files: vec!["mine.toml".into()],
            ..Selection::default()
        };
        assert_eq!(named.files(&at), [PathBuf::from("mine.toml")]);
        assert_eq!(
            named.anchored(Path::new("/p")).files,
            [PathBuf::from("/p/mine.toml")]
        );
        // An unreadable trusted key is named.
        let keyed = Selection {
            trusted_keys: vec![tmp.join("nope.pub")],
            ..Selection::default()
        };
        let Err(e) = keyed.load(&at) else {
            panic!("a missing trusted key was accepted")
        };
        let e = e.to_string();
        assert!(e.contains("nope.pub"), "{e}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
