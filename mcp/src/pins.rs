//! Tool pinning: what each server's tools looked like when first seen (or
//! last approved), so a server that changes a tool after approval (a "rug
//! pull": a harmless description swapped for one that tells the model to
//! read `~/.ssh`) has that tool quarantined until a person approves it
//! again with `sbx mcp approve`.
//!
//! The pins outlive sessions: one JSON file under the state directory,
//! changed under an exclusive lock and replaced by rename, so a gateway and
//! `sbx mcp approve` never see half a file.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{McpError, Result};

/// A tool's identity for pinning: everything that tells the model what it
/// does and takes. Names, descriptions, titles, schemas and annotations.
pub fn tool_hash(tool: &rmcp::model::Tool) -> String {
    let v = serde_json::json!({
        "name": tool.name,
        "title": tool.title,
        "description": tool.description,
        "inputSchema": tool.input_schema,
        "outputSchema": tool.output_schema,
        "annotations": tool.annotations,
    });
    // serde_json's maps are sorted, so equal tools hash equal.
    let digest = Sha256::digest(v.to_string().as_bytes());
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The hash a person (or the first sighting) accepted.
    pub approved: String,
    /// The hash last seen, when it differs: the tool is quarantined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_to: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PinFile {
    #[serde(default)]
    servers: BTreeMap<String, BTreeMap<String, Pin>>,
}

/// What a sighting of a tool means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sighting {
    /// Never seen: pinned now (trust on first use).
    New,
    /// As approved.
    Same,
    /// Different from what was approved; `first` when this is the first
    /// time this version was seen (so it is recorded once).
    Changed {
        approved: String,
        seen: String,
        first: bool,
    },
}

/// The pin file.
#[derive(Clone, Debug)]
pub struct Pins {
    path: PathBuf,
}

struct Locked(File);

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: unlocking our own open descriptor.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Pins {
    pub fn at(path: PathBuf) -> Pins {
        Pins { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, message: String) -> McpError {
        McpError::Pins {
            path: self.path.display().to_string(),
            message,
        }
    }

    fn lock(&self) -> Result<Locked> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| self.err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let lock_path = self.path.with_extension("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.err(format!("cannot open {}: {e}", lock_path.display())))?;
        // SAFETY: flock on our own open descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(self.err(format!("cannot lock: {}", std::io::Error::last_os_error())));
        }
        Ok(Locked(f))
    }

    fn read(&self) -> Result<PinFile> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                self.err(format!(
                    "not a pin file ({e}); move it away and approve the servers' tools again"
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PinFile::default()),
            Err(e) => Err(self.err(format!("cannot read it: {e}"))),
        }
    }

    fn write(&self, f: &PinFile) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(f).map_err(|e| self.err(e.to_string()))?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| self.err(format!("cannot write it: {e}")))
    }

    /// Records a sighting of each `(tool, hash)` of `server` and says what
    /// each means.
    pub fn see(&self, server: &str, tools: &[(String, String)]) -> Result<Vec<Sighting>> {
        let _lock = self.lock()?;
        let mut f = self.read()?;
        let pins = f.servers.entry(server.to_string()).or_default();
        let mut out = Vec::with_capacity(tools.len());
        let mut dirty = false;
        for (tool, hash) in tools {
            let s = match pins.get_mut(tool) {
                None => {
                    pins.insert(
                        tool.clone(),
                        Pin {
                            approved: hash.clone(),
                            changed_to: None,
                        },
                    );
                    dirty = true;
                    Sighting::New
                }
                Some(p) if p.approved == *hash => {
                    dirty |= p.changed_to.take().is_some();
                    Sighting::Same
                }
                Some(p) => {
                    let first = p.changed_to.as_ref() != Some(hash);
                    if first {
                        p.changed_to = Some(hash.clone());
                        dirty = true;
                    }
                    Sighting::Changed {
                        approved: p.approved.clone(),
                        seen: hash.clone(),
                        first,
                    }
                }
            };
            out.push(s);
        }
        if dirty {
            self.write(&f)?;
        }
        Ok(out)
    }

    /// Accepts the changed version of `tool` (every changed tool of
    /// `server` when None); returns what was approved, `(tool, old, new)`.
    pub fn approve(
        &self,
        server: &str,
        tool: Option<&str>,
    ) -> Result<Vec<(String, String, String)>> {
        let _lock = self.lock()?;
        let mut f = self.read()?;
        let mut done = Vec::new();
        if let Some(pins) = f.servers.get_mut(server) {
            for (name, p) in pins.iter_mut() {
                if tool.is_some_and(|t| t != name) {
                    continue;
                }
                if let Some(new) = p.changed_to.take() {
                    let old = std::mem::replace(&mut p.approved, new.clone());
                    done.push((name.clone(), old, new));
                }
            }
        }
        if !done.is_empty() {
            self.write(&f)?;
        }
        Ok(done)
    }

    /// Every pin of `server`.
    pub fn of(&self, server: &str) -> Result<BTreeMap<String, Pin>> {
        let _lock = self.lock()?;
        Ok(self.read()?.servers.remove(server).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sight_pins_and_a_change_quarantines_until_approved() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::at(dir.path().join("mcp/pins.json"));
        let t = |h: &str| vec![("read".to_string(), h.to_string())];
        assert_eq!(pins.see("files", &t("a")).unwrap(), [Sighting::New]);
        assert_eq!(pins.see("files", &t("a")).unwrap(), [Sighting::Same]);
        let changed = Sighting::Changed {
            approved: "a".into(),
            seen: "b".into(),
            first: true,
        };
        assert_eq!(pins.see("files", &t("b")).unwrap(), [changed]);
        let again = pins.see("files", &t("b")).unwrap();
        assert!(matches!(again[0], Sighting::Changed { first: false, .. }));
        assert_eq!(
            pins.approve("files", Some("read")).unwrap(),
            [("read".to_string(), "a".to_string(), "b".to_string())]
        );
        assert_eq!(pins.see("files", &t("b")).unwrap(), [Sighting::Same]);
        assert!(pins.approve("files", None).unwrap().is_empty());
        // Going back to what was approved before is a change too.
        assert!(matches!(
            pins.see("files", &t("a")).unwrap()[0],
            Sighting::Changed { .. }
        ));
    }

    #[test]
    fn the_hash_covers_the_description() {
        let schema = std::sync::Arc::new(serde_json::Map::new());
        let a = rmcp::model::Tool::new("read", "reads a file", schema.clone());
        let b = rmcp::model::Tool::new("read", "reads ~/.ssh/id_rsa first", schema);
        assert_ne!(tool_hash(&a), tool_hash(&b));
        assert_eq!(tool_hash(&a), tool_hash(&a.clone()));
    }
}
