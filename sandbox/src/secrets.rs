//! The secrets the egress proxy injects, kept on the host and encrypted at
//! rest (ChaCha20-Poly1305). Each value is sealed with the store's key and
//! its own name, so a file copied to another name does not open. The key
//! lives apart from the values (config dir vs state dir), so a backup or
//! sync of one is not enough to read them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use crate::error::{fail, At, Error, Result};
use crate::paths;

fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::Session(format!("no randomness: {e}")))
}

/// The encrypted store.
pub struct Store {
    key_path: PathBuf,
    dir: PathBuf,
}

/// Secret names are what the policy's `secret =` says: letters, digits and `_`.
pub fn check_name(name: &str) -> Result<()> {
    let mut c = name.chars();
    let ok = c
        .next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        && name.len() <= 64;
    if !ok {
        fail!(Invalid, "`{name}` is not a secret name: use letters, digits and `_` (at most 64), not starting with a digit, as in GITHUB_TOKEN");
    }
    Ok(())
}

/// Writes `data` to `path` readable by its owner only, whole or not at
/// all (a temporary file, synced, renamed into place).
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .at(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .at(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).at(|| format!("cannot write {}", path.display()))
}

impl Store {
    pub fn open() -> Store {
        Store {
            key_path: paths::config_dir().join("secrets.key"),
            dir: paths::state_dir().join("secrets"),
        }
    }

    fn cipher(&self, create: bool) -> Result<Option<ChaCha20Poly1305>> {
        let key = match std::fs::read(&self.key_path) {
            Ok(k) if k.len() == 32 => k,
            Ok(_) => fail!(
                Session,
                "{} is not a 32-byte key; it was damaged. Remove it and set every secret again",
                self.key_path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut k = vec![0u8; 32];
                random(&mut k)?;
                if let Some(p) = self.key_path.parent() {
                    crate::paths::private_dir(p)?;
                }
                write_private(&self.key_path, &k)?;
                k
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(|| format!("cannot read {}", self.key_path.display())),
        };
        Ok(Some(ChaCha20Poly1305::new(Key::from_slice(&key))))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.secret"))
    }

    pub fn set(&self, name: &str, value: &[u8]) -> Result<()> {
        check_name(name)?;
        let cipher = self.cipher(true)?.expect("created");
        let mut nonce = [0u8; 12];
        random(&mut nonce)?;
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| Error::Session(format!("cannot encrypt secret {name}")))?;
        crate::paths::private_dir(&self.dir)?;
        let mut data = nonce.to_vec();
        data.extend(sealed);
        write_private(&self.path(name), &data)
    }

    /// The value of `name`, or None if it was never set.
    pub fn get(&self, name: &str) -> Result<Option<String>> {
        check_name(name)?;
        let data = match std::fs::read(self.path(name)) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(|| format!("cannot read secret {name}")),
        };
        let Some(cipher) = self.cipher(false)? else {
            fail!(
                Session,
                "secret {name} is stored but {} is missing; set it again",
                self.key_path.display()
            );
        };
        if data.len() < 12 {
            fail!(
                Session,
                "{} is damaged; set secret {name} again",
                self.path(name).display()
            );
        }
        let plain = cipher
            .decrypt(
                Nonce::from_slice(&data[..12]),
                Payload {
                    msg: &data[12..],
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| {
                Error::Session(format!(
                    "{} does not decrypt with {} (damaged, or from another store); set secret {name} again",
                    self.path(name).display(),
                    self.key_path.display()
                ))
            })?;
        match String::from_utf8(plain) {
            Ok(v) => Ok(Some(v)),
            Err(_) => fail!(Session, "secret {name} is not UTF-8 text"),
        }
    }

    pub fn names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).at(|| format!("cannot list {}", self.dir.display())),
        };
        for e in entries.flatten() {
            if let Some(n) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".secret"))
            {
                out.push(n.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn remove(&self, name: &str) -> Result<bool> {
        check_name(name)?;
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).at(|| format!("cannot remove secret {name}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn values_round_trip_and_are_bound_to_their_name() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store {
            key_path: tmp.path().join("cfg/secrets.key"),
            dir: tmp.path().join("state/secrets"),
        };
        assert_eq!(store.get("A").unwrap(), None);
        store.set("A", b"one").unwrap();
        store.set("B", b"two").unwrap();
        assert_eq!(store.get("A").unwrap().as_deref(), Some("one"));
        assert_eq!(store.names().unwrap(), ["A", "B"]);
        let on_disk = std::fs::read(store.path("A")).unwrap();
        assert!(!on_disk.windows(3).any(|w| w == b"one"));
        let mode = std::fs::metadata(store.path("A"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A value copied under another name does not open.
        std::fs::copy(store.path("A"), store.path("B")).unwrap();
        assert!(store
            .get("B")
            .unwrap_err()
            .to_string()
            .contains("does not decrypt"));
        assert!(store.set("1BAD", b"x").is_err());
        assert!(store.remove("A").unwrap());
        assert!(!store.remove("A").unwrap());
    }
}
