//! Applying an image's layers, in order, to a staging directory, as the
//! OCI image spec says: whiteouts delete, opaque directories hide what
//! lower layers put there, hard links and symlinks are kept, and no entry
//! can land outside the staging directory (parents are resolved inside it,
//! symlinks included, as a chroot would).
//!
//! The staging directory holds the bytes; who owns each file, its exact
//! mode, device numbers and extended attributes are kept in [`Tree`]'s
//! table instead, since sbx may run as a user who cannot set them. The
//! file system image built from the directory gets them from the table
//! (see [`crate::ext4`]).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{malformed, At, Result};

/// What an entry is beyond its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A device or FIFO, staged as an empty file: `c`, `b` or `p`.
    Special {
        kind: char,
        major: u32,
        minor: u32,
    },
}

/// An entry's wanted owner, mode and attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with setuid, setgid and sticky (0o7777).
    pub mode: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Limits symlink hops while resolving one path, as the kernel does.
const MAX_HOPS: u32 = 40;

/// The staging directory and the table of what it should be.
pub struct Tree {
    root: PathBuf,
    /// Keyed by the path inside the image (`/etc/passwd`; `/` for the root).
    meta: BTreeMap<String, Meta>,
}

impl Tree {
    /// An empty tree staged in `root` (created here).
    pub fn new(root: &Path) -> Result<Tree> {
        fs::create_dir_all(root).at(|| format!("cannot create {}", root.display()))?;
        let mut meta = BTreeMap::new();
        meta.insert("/".to_string(), dir_meta(0o755));
        Ok(Tree {
            root: root.to_path_buf(),
            meta,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    #[cfg(test)]
    pub fn meta_for_test(&self, key: &str) -> Meta {
        self.meta[key].clone()
    }

    pub fn entries(&self) -> impl Iterator<Item = (&String, &Meta)> {
        self.meta.iter()
    }

    /// The host path of an image path.
    pub fn host(&self, key: &str) -> PathBuf {
        self.root.join(key.trim_start_matches('/'))
    }

    /// Applies one layer (an uncompressed tar stream). `layer` names it in errors.
    pub fn apply(&mut self, tar: impl Read, layer: &str) -> Result<()> {
        let mut archive = tar::Archive::new(tar);
        let mut this_layer: HashSet<String> = HashSet::new();
        let entries = archive
            .entries()
            .at(|| format!("layer {layer}: not a tar archive"))?;
        for entry in entries {
            let mut entry = entry.at(|| format!("layer {layer}: a damaged tar entry"))?;
            let raw = entry
                .path()
                .at(|| format!("layer {layer}: an entry with an unreadable name"))?
                .into_owned();
            let Some(parts) = clean(&raw) else {
                malformed!(
                    "layer {layer}: entry {} leaves the image's root",
                    raw.display()
                );
            };
            let Some((leaf, parents)) = parts.split_last() else {
                // The root itself: only its metadata.
                let m = header_meta(&mut entry, Kind::Dir)?;
                self.meta.insert("/".into(), m);
                continue;
            };
            let leaf_str = leaf.to_string_lossy().into_owned();
            if let Some(hidden) = leaf_str.strip_prefix(".wh.") {
                let dir = self.resolve(parents, layer)?;
                if hidden == ".wh..opq" {
                    self.make_opaque(&dir, &this_layer)?;
                } else {
                    self.remove(&dir.join(hidden))?;
                }
                continue;
            }
            let dir = self.resolve(parents, layer)?;
            let host = dir.join(leaf);
            let key = self.key(&host);
            let et = entry.header().entry_type();
            if et.is_dir() {
                match fs::symlink_metadata(&host) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.remove(&host)?;
                        mkdir(&host)?;
                    }
                    Err(_) => mkdir(&host)?,
                }
                let m = header_meta(&mut entry, Kind::Dir)?;
                stage_mode(&host, &m)?;
                self.meta.insert(key.clone(), m);
            } else if et.is_file() {
                self.remove(&host)?;
                let m = header_meta(&mut entry, Kind::File)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&host)
                    .at(|| format!("cannot create {}", host.display()))?;
                std::io::copy(&mut entry, &mut f)
                    .at(|| format!("layer {layer}: cannot unpack {key}"))?;
                stage_mode(&host, &m)?;
                self.meta.insert(key.clone(), m);
            } else if et.is_symlink() {
                self.remove(&host)?;
                let target = entry
                    .link_name()
                    .at(|| format!("layer {layer}: {key}: unreadable link target"))?
                    .unwrap_or_default()
                    .into_owned();
                std::os::unix::fs::symlink(&target, &host)
                    .at(|| format!("cannot create the symlink {}", host.display()))?;
                let m = header_meta(&mut entry, Kind::Symlink)?;
                self.meta.insert(key.clone(), m);
            } else if et.is_hard_link() {
                let target = entry
                    .link_name()
                    .at(|| format!("layer {layer}: {key}: unreadable link target"))?
                    .unwrap_or_default()
                    .into_owned();
                let Some(tparts) = clean(&target) else {
                    malformed!("layer {layer}: hard link {key} leaves the image's root");
                };
                let Some((tleaf, tparents)) = tparts.split_last() else {
                    malformed!("layer {layer}: hard link {key} points at the root");
                };
                let thost = self.resolve(tparents, layer)?.join(tleaf);
                let tkey = self.key(&thost);
                let Some(tmeta) = self.meta.get(&tkey).cloned() else {
                    malformed!(
                        "layer {layer}: hard link {key} points at {tkey}, which no layer made"
                    );
                };
                if thost == host {
                    continue;
                }
                self.remove(&host)?;
                fs::hard_link(&thost, &host)
                    .at(|| format!("cannot link {} to {}", host.display(), thost.display()))?;
                self.meta.insert(key.clone(), tmeta);
            } else if et.is_character_special() || et.is_block_special() || et.is_fifo() {
                self.remove(&host)?;
                let h = entry.header();
                let kind = Kind::Special {
                    kind: if et.is_fifo() {
                        'p'
                    } else if et.is_character_special() {
                        'c'
                    } else {
                        'b'
                    },
                    major: h.device_major().ok().flatten().unwrap_or(0),
                    minor: h.device_minor().ok().flatten().unwrap_or(0),
                };
                fs::File::create(&host).at(|| format!("cannot create {}", host.display()))?;
                let m = header_meta(&mut entry, kind)?;
                self.meta.insert(key.clone(), m);
            } else {
                tracing::debug!(entry = %key, "skipping a tar entry of a kind images do not use");
                continue;
            }
            this_layer.insert(key);
        }
        Ok(())
    }

    /// The image path of a host path inside the staging directory.
    fn key(&self, host: &Path) -> String {
        let rel = host.strip_prefix(&self.root).unwrap_or(host);
        format!("/{}", rel.to_string_lossy())
    }

    /// The host directory `parents` name, resolved inside the root:
    /// symlinks are followed as if the root were `/`, `..` stops at the
    /// root, and missing directories are made.
    fn resolve(&mut self, parents: &[OsString], layer: &str) -> Result<PathBuf> {
        let mut at: Vec<OsString> = Vec::new();
        let mut todo: VecDeque<OsString> = parents.iter().cloned().collect();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                at.pop();
                continue;
            }
            if c == "." || c.is_empty() {
                continue;
            }
            let mut here = self.root.clone();
            here.extend(&at);
            here.push(&c);
            match fs::symlink_metadata(&here) {
                Ok(m) if m.is_dir() => at.push(c),
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        malformed!("layer {layer}: too many symlinks under {}", here.display());
                    }
                    let target =
                        fs::read_link(&here).at(|| format!("cannot read {}", here.display()))?;
                    if target.is_absolute() {
                        at.clear();
                    }
                    for (i, part) in raw_parts(&target).into_iter().enumerate() {
                        todo.insert(i, part);
                    }
                }
                Ok(_) => malformed!(
                    "layer {layer}: {} is a file, yet entries are put under it",
                    self.key(&here)
                ),
                Err(_) => {
                    mkdir(&here)?;
                    let key = self.key(&here);
                    self.meta.insert(key, dir_meta(0o755));
                    at.push(c);
                }
            }
        }
        let mut dir = self.root.clone();
        dir.extend(&at);
        Ok(dir)
    }

    /// Deletes `host` (whatever it is) and everything recorded under it.
    fn remove(&mut self, host: &Path) -> Result<()> {
        let Ok(m) = fs::symlink_metadata(host) else {
            return Ok(());
        };
        if host == self.root {
            return Ok(());
        }
        let r = if m.is_dir() {
            fs::remove_dir_all(host)
        } else {
            fs::remove_file(host)
        };
        r.at(|| format!("cannot remove {}", host.display()))?;
        let key = self.key(host);
        let below = format!("{key}/");
        self.meta.retain(|k, _| k != &key && !k.starts_with(&below));
        Ok(())
    }

    /// An opaque directory: what lower layers put in `dir` is gone.
    fn make_opaque(&mut self, dir: &Path, this_layer: &HashSet<String>) -> Result<()> {
        let entries = fs::read_dir(dir).at(|| format!("cannot list {}", dir.display()))?;
        for e in entries.flatten() {
            let path = e.path();
            if !this_layer.contains(&self.key(&path)) {
                self.remove(&path)?;
            }
        }
        Ok(())
    }
}

fn dir_meta(mode: u32) -> Meta {
    Meta {
        kind: Kind::Dir,
        uid: 0,
        gid: 0,
        mode,
        xattrs: Vec::new(),
    }
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir(path).at(|| format!("cannot create {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .at(|| format!("cannot set the mode of {}", path.display()))
}

/// The staged mode: the wanted permissions, always readable and writable
/// by the user building the image, without setuid, setgid or sticky bits
/// (the file system image gets the exact mode from the table).
fn stage_mode(host: &Path, m: &Meta) -> Result<()> {
    let mode = staged_mode(m);
    fs::set_permissions(host, fs::Permissions::from_mode(mode))
        .at(|| format!("cannot set the mode of {}", host.display()))
}

pub fn staged_mode(m: &Meta) -> u32 {
    let own = if m.kind == Kind::Dir { 0o700 } else { 0o600 };
    (m.mode & 0o777) | own
}

/// Owner, mode and extended attributes (PAX `SCHILY.xattr.*`) from an entry's header.
fn header_meta<R: Read>(entry: &mut tar::Entry<'_, R>, kind: Kind) -> Result<Meta> {
    let h = entry.header();
    let uid = h
        .uid()
        .ok()
        .and_then(|u| u32::try_from(u).ok())
        .unwrap_or(0);
    let gid = h
        .gid()
        .ok()
        .and_then(|g| u32::try_from(g).ok())
        .unwrap_or(0);
    let mode = h.mode().unwrap_or(0o644) & 0o7777;
    let mut xattrs = Vec::new();
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            if let Ok(key) = ext.key() {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(Meta {
        kind,
        uid,
        gid,
        mode,
        xattrs,
    })
}

/// An entry's path as normal components; None if `..` would leave the root.
fn clean(path: &Path) -> Option<Vec<OsString>> {
    let mut out: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p.to_os_string()),
            Component::ParentDir => {
                out.pop()?;
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// A symlink target's components, `..` kept (resolved by the caller).
fn raw_parts(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// The staged owner of `host` (the user who built it) and its mode.
pub fn staged(host: &Path) -> Option<(u32, u32, u32)> {
    fs::symlink_metadata(host)
        .ok()
        .map(|m| (m.uid(), m.gid(), m.mode() & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar stream from (path, kind, body or link target, mode, uid):
    /// kinds `d`irectory, `f`ile, `l` symlink, `h`ard link, `c` (1:3).
    fn layer(entries: &[(&str, char, &str, u32, u64)]) -> Vec<u8> {
        let mut l = crate::testing::Layer::new();
        for &(path, kind, body, mode, uid) in entries {
            l = match kind {
                'd' => l.dir(path, mode, uid),
                'f' => l.file(path, mode, uid, body.as_bytes()),
                'l' => l.symlink(path, body),
                'h' => l.hardlink(path, body),
                'c' => l.char_dev(path, mode, 1, 3),
                _ => unreachable!(),
            };
        }
        l.bytes()
    }

    #[test]
    fn layers_apply_with_whiteouts_links_and_owners() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new(&dir.path().join("root")).unwrap();
        t.apply(
            &layer(&[
                ("etc/", 'd', "", 0o755, 0),
                ("etc/passwd", 'f', "root:x:0:0\n", 0o644, 0),
                ("etc/gone", 'f', "x", 0o644, 0),
                ("usr/lib/", 'd', "", 0o755, 0),
                ("lib", 'l', "usr/lib", 0o777, 0),
                ("home/agent/", 'd', "", 0o700, 1000),
                ("home/agent/notes", 'f', "mine", 0o600, 1000),
                ("bin/su", 'f', "elf", 0o4755, 0),
                ("bin/su2", 'h', "bin/su", 0o4755, 0),
                ("dev/null", 'c', "", 0o666, 0),
                ("opt/old/", 'd', "", 0o755, 0),
                ("opt/old/a", 'f', "a", 0o644, 0),
            ])[..],
            "one",
        )
        .unwrap();
        t.apply(
            &layer(&[
                ("etc/.wh.gone", 'f', "", 0o644, 0),
                // Through the merged-usr symlink: lands in usr/lib.
                ("lib/libx.so", 'f', "lib", 0o644, 0),
                ("opt/old/.wh..wh..opq", 'f', "", 0o644, 0),
                ("opt/old/b", 'f', "b", 0o644, 0),
            ])[..],
            "two",
        )
        .unwrap();
        let root = t.root().to_path_buf();
        assert!(!root.join("etc/gone").exists());
        assert!(!t.meta.contains_key("/etc/gone"));
        assert_eq!(
            fs::read_to_string(root.join("usr/lib/libx.so")).unwrap(),
            "lib"
        );
        assert!(t.meta.contains_key("/usr/lib/libx.so"));
        assert!(!root.join("opt/old/a").exists() && root.join("opt/old/b").exists());
        let notes = &t.meta["/home/agent/notes"];
        assert_eq!((notes.uid, notes.gid, notes.mode), (1000, 1000, 0o600));
        assert_eq!(t.meta["/bin/su"].mode, 0o4755);
        // Staged without the setuid bit; the hard link shares the inode.
        let su = fs::metadata(root.join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o755);
        assert_eq!(su.ino(), fs::metadata(root.join("bin/su2")).unwrap().ino());
        assert_eq!(
            t.meta["/dev/null"].kind,
            Kind::Special {
                kind: 'c',
                major: 1,
                minor: 3
            }
        );
    }

    #[test]
    fn nothing_lands_outside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut t = Tree::new(&dir.path().join("root")).unwrap();
        // A symlink to an absolute host path, then a file through it: the
        // link resolves inside the root.
        t.apply(
            &layer(&[
                ("escape", 'l', outside.to_str().unwrap(), 0o777, 0),
                ("up", 'l', "../../../..", 0o777, 0),
            ])[..],
            "one",
        )
        .unwrap();
        t.apply(
            &layer(&[
                ("escape/owned", 'f', "x", 0o644, 0),
                ("up/owned2", 'f', "x", 0o644, 0),
            ])[..],
            "two",
        )
        .unwrap();
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(t
            .root()
            .join(outside.strip_prefix("/").unwrap())
            .join("owned")
            .exists());
        assert!(t.root().join("owned2").exists());
        // `..` past the root in an entry's own name is refused.
        let mut raw = tar::Header::new_gnu();
        raw.set_size(1);
        raw.set_entry_type(tar::EntryType::Regular);
        let mut bytes = layer(&[]);
        // Writing a `..` name needs the raw header: the builder refuses it.
        bytes.truncate(0);
        let name = b"../evil";
        raw.as_old_mut().name[..name.len()].copy_from_slice(name);
        raw.set_cksum();
        bytes.extend_from_slice(raw.as_bytes());
        bytes.extend_from_slice(&[b'x'; 512]);
        bytes.extend_from_slice(&[0; 1024]);
        let e = t.apply(&bytes[..], "three").unwrap_err().to_string();
        assert!(e.contains("leaves the image's root"), "{e}");
        assert!(!dir.path().join("evil").exists());
    }
}
