//! The image store under the cache directory: content-addressed blobs,
//! one root file system per image configuration, and an index of names.
//!
//! ```text
//! images/
//!   blobs/sha256/<hex>     manifests, configs and layers, as fetched
//!   roots/<config hex>.ext4  the read-only root file systems
//!   roots/saved-<hex>.ext4   layers saved from sessions (template builds)
//!   index.json             names -> records (replaced whole, atomically)
//!   tmp/                   work in progress (removed on failure)
//!   lock                   held while the store changes
//! ```
//!
//! Everything lands in `tmp/` first and is renamed into place when
//! complete and checked, so an interrupted pull or import leaves nothing
//! half-written where a session could find it.
//!
//! An image made from a session (a template's build) is its base image's
//! root with the session's writable layer kept as it was, stacked over it:
//! saving it copies and converts nothing, and every template shares its
//! base's root file system.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hashing};
use crate::error::{malformed, At, ImageError, Result};
use crate::manifest::{Config, Manifest};
use crate::{ext4, unpack};

/// What the store knows of one named image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// The manifest's digest: what `NAME@sha256:…` pins.
    pub digest: Digest,
    pub config: Digest,
    pub layers: Vec<Digest>,
    /// Bytes of the root file system image (sparse on disk).
    pub root_size: u64,
    /// The files under `roots/` the root is made of, topmost first: layers
    /// saved from sessions, then the unpacked image. Records from before
    /// saved layers leave it empty: `<config hex>.ext4`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<String>,
    /// Where it came from: `pulled from …` or `imported from …`.
    pub source: String,
    /// Unix seconds.
    pub added: u64,
    /// The image's own settings for the processes it runs.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub workdir: Option<String>,
}

#[derive(Default, Serialize, Deserialize)]
struct Index {
    images: Vec<ImageRecord>,
}

/// What an image made from another is called and runs with.
pub struct Derived {
    pub name: String,
    /// `NAME=VALUE`, each replacing the base's value of that name.
    pub env: Vec<String>,
    pub user: Option<String>,
    /// Where it came from, for `sbx image ls`.
    pub source: String,
}

/// Progress lines for long work (`pulling layer 2/5 …`).
pub type Progress<'a> = &'a dyn Fn(&str);

pub struct Store {
    root: PathBuf,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// The store at `root` (made on first use).
    pub fn open(root: &Path) -> Result<Store> {
        for d in ["blobs/sha256", "roots", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p)
                .at(|| format!("cannot create the image store's {}", p.display()))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Held while the store changes; released when dropped.
    fn lock(&self) -> Result<File> {
        let path = self.root.join("lock");
        let f = File::create(&path).at(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ImageError::Locked(self.root.clone()));
        }
        Ok(f)
    }

    /// A fresh path in `tmp/`, unique to this process.
    pub fn tmp(&self, what: &str) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Stores what `from` yields as a blob, checked against `expected`
    /// when given; returns its digest and size.
    pub fn put_blob(
        &self,
        from: &mut dyn Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64)> {
        let tmp = self.tmp("blob");
        let result = (|| {
            let file = File::create(&tmp).at(|| format!("cannot create {}", tmp.display()))?;
            let mut w = Hashing::new(std::io::BufWriter::new(file));
            std::io::copy(from, &mut w).at(|| "cannot read a blob".into())?;
            let size = w.count();
            let (buf, digest) = w.finish();
            let file = buf
                .into_inner()
                .map_err(|e| e.into_error())
                .at(|| format!("cannot write {}", tmp.display()))?;
            file.sync_all()
                .at(|| format!("cannot write {}", tmp.display()))?;
            if let Some(e) = expected {
                e.verify(&digest)?;
            }
            let dest = self.blob_path(&digest);
            fs::rename(&tmp, &dest).at(|| format!("cannot store {}", dest.display()))?;
            Ok((digest, size))
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    /// A stored blob's bytes (for manifests and configs), checked again.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(d);
        let bytes = fs::read(&path).at(|| format!("cannot read blob {d}"))?;
        d.verify(&Digest::of(&bytes))?;
        Ok(bytes)
    }

    fn read_index(&self) -> Result<Index> {
        let path = self.root.join("index.json");
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                ImageError::Malformed(format!(
                    "the image index {} is damaged ({e}); remove it and pull or import the images again",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(e).at(|| format!("cannot read {}", path.display())),
        }
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        let path = self.root.join("index.json");
        let tmp = self.tmp("index");
        let bytes = serde_json::to_vec_pretty(index).unwrap_or_default();
        let mut f = File::create(&tmp).at(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .at(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &path).at(|| format!("cannot replace {}", path.display()))
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.read_index()?.images)
    }

    /// The image `name` names: a name as pulled or imported (`:latest`
    /// may be left off), optionally pinned with `@sha256:…`.
    pub fn find(&self, name: &str) -> Result<ImageRecord> {
        let (name, pin) = match name.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d)?)),
            None => (name, None),
        };
        let images = self.list()?;
        let latest = format!("{name}:latest");
        let found = images
            .iter()
            .find(|i| i.name == name)
            .or_else(|| images.iter().find(|i| i.name == latest))
            .or_else(|| {
                // A bare pin: any image with that manifest digest.
                pin.as_ref()
                    .filter(|_| name.is_empty())
                    .and_then(|p| images.iter().find(|i| &i.digest == p))
            });
        let Some(found) = found else {
            return Err(ImageError::NotFound(name.to_string()));
        };
        if let Some(p) = pin {
            if found.digest != p {
                return Err(ImageError::Malformed(format!(
                    "image {name} is {} here, not the pinned {p}; pull it again by that digest",
                    found.digest
                )));
            }
        }
        Ok(found.clone())
    }

    /// The disks `record`'s root is made of, topmost first; the last is
    /// the unpacked image, the others saved layers.
    pub fn root_paths(&self, record: &ImageRecord) -> Vec<PathBuf> {
        let dir = self.root.join("roots");
        record.root_files().iter().map(|f| dir.join(f)).collect()
    }

    /// Unpacks `manifest`'s layers (already stored) into a root file system
    /// (unless one for its config exists) and records it as `name`.
    pub fn install(
        &self,
        name: &str,
        manifest_digest: &Digest,
        manifest: &Manifest,
        source: &str,
        progress: Progress<'_>,
    ) -> Result<ImageRecord> {
        let config_bytes = self.read_blob(&manifest.config.digest)?;
        let config = Config::parse(&config_bytes, name)?;
        let (env, user, workdir) = run_settings(&config);
        let _lock = self.lock()?;
        let probe = ImageRecord {
            name: name.to_string(),
            digest: manifest_digest.clone(),
            config: manifest.config.digest.clone(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            root_size: 0,
            roots: vec![unpacked_root(&manifest.config.digest)],
            source: source.to_string(),
            added: now(),
            env,
            user,
            workdir,
        };
        let root = self.root.join("roots").join(&probe.roots[0]);
        if !root.is_file() {
            self.build_root(name, manifest, &config, &root, progress)?;
        }
        let root_size = fs::metadata(&root)
            .at(|| format!("cannot stat {}", root.display()))?
            .len();
        self.record(ImageRecord { root_size, ..probe })
    }

    /// Adds `record` to the index (replacing one of its name).
    fn record(&self, record: ImageRecord) -> Result<ImageRecord> {
        let mut index = self.read_index()?;
        index.images.retain(|i| i.name != record.name);
        index.images.push(record.clone());
        index.images.sort_by(|a, b| a.name.cmp(&b.name));
        self.write_index(&index)?;
        Ok(record)
    }

    fn build_root(
        &self,
        name: &str,
        manifest: &Manifest,
        config: &Config,
        dest: &Path,
        progress: Progress<'_>,
    ) -> Result<()> {
        let work = self.tmp("unpack");
        let result = (|| {
            let mut tree = unpack::Tree::new(&work.join("root"))?;
            let n = manifest.layers.len();
            for (i, layer) in manifest.layers.iter().enumerate() {
                progress(&format!(
                    "unpacking layer {}/{n} ({}, {})",
                    i + 1,
                    short(&layer.digest),
                    human(layer.size)
                ));
                let file = File::open(self.blob_path(&layer.digest))
                    .at(|| format!("cannot open layer {}", layer.digest))?;
                let mut tar = Hashing::new(decompress(file, &layer.digest)?);
                tree.apply(&mut tar, layer.digest.as_str())?;
                // The tar reader stops at its end marker; the rest counts too.
                std::io::copy(&mut tar, &mut std::io::sink())
                    .at(|| format!("cannot read layer {}", layer.digest))?;
                let (_, diff_id) = tar.finish();
                if let Some(want) = config.rootfs.diff_ids.get(i) {
                    want.verify(&diff_id)?;
                }
            }
            progress(&format!("making the root file system of {name}"));
            let out = work.join("root.ext4");
            ext4::build(&tree, &out, &work)?;
            fs::rename(&out, dest).at(|| format!("cannot store {}", dest.display()))?;
            Ok(())
        })();
        let _ = fs::remove_dir_all(&work);
        result
    }

    /// A new image: `base` with `disk` (the writable layer of a session
    /// made from `base`, its VM ended) stacked over it, named and set up
    /// as `new` says. The disk moves into the store as it is, after
    /// `e2fsck` has made it consistent (the VM may have ended mid-write).
    pub fn save(
        &self,
        base: &ImageRecord,
        disk: &Path,
        new: &Derived,
        progress: Progress<'_>,
    ) -> Result<ImageRecord> {
        progress("checking the saved layer's file system");
        ext4::repair(disk)?;
        let config_bytes = derived_config(&self.read_blob(&base.config)?, base, new)?;
        let config = Config::parse(&config_bytes, &new.name)?;
        let (config_digest, _) = self.put_blob(&mut &config_bytes[..], None)?;
        // A saved layer has no manifest; its digest names this save.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let digest = Digest::of(
            format!(
                "sbx saved layer\0{}\0{config_digest}\0{}\0{stamp}\0{}",
                base.digest,
                new.source,
                std::process::id()
            )
            .as_bytes(),
        );
        let file = format!("saved-{}.ext4", &digest.hex()[..32]);
        let dest = self.root.join("roots").join(&file);
        let _lock = self.lock()?;
        move_file(disk, &dest, &self.tmp("saved"))?;
        let allocated = {
            use std::os::unix::fs::MetadataExt as _;
            fs::metadata(&dest).map_or(0, |m| m.blocks() * 512)
        };
        let mut roots = vec![file];
        roots.extend(base.root_files());
        let (env, user, workdir) = run_settings(&config);
        let recorded = self.record(ImageRecord {
            name: new.name.clone(),
            digest,
            config: config_digest,
            layers: base.layers.clone(),
            root_size: base.root_size + allocated,
            roots,
            source: new.source.clone(),
            added: now(),
            env,
            user,
            workdir,
        });
        if recorded.is_err() {
            let _ = fs::remove_file(&dest);
        }
        recorded
    }

    /// Forgets `name`; its root file system and blobs go when no other
    /// image uses them. Refused while a session runs from it.
    pub fn remove(&self, name: &str) -> Result<ImageRecord> {
        let _lock = self.lock()?;
        let record = self.find(name)?;
        let mut index = self.read_index()?;
        index.images.retain(|i| i.name != record.name);
        let used: std::collections::HashSet<PathBuf> = index
            .images
            .iter()
            .flat_map(|i| self.root_paths(i))
            .collect();
        let unused: Vec<PathBuf> = self
            .root_paths(&record)
            .into_iter()
            .filter(|p| !used.contains(p))
            .collect();
        // Running VMs hold a shared lock on the disks they boot from.
        let mut held = Vec::new();
        for root in &unused {
            if let Ok(f) = File::open(root) {
                // SAFETY: flock on a descriptor we own.
                if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                    return Err(ImageError::InUse(record.name.clone()));
                }
                held.push(f);
            }
        }
        for root in &unused {
            let _ = fs::remove_file(root);
        }
        drop(held);
        self.write_index(&index)?;
        let kept: std::collections::HashSet<&Digest> = index
            .images
            .iter()
            .flat_map(|i| {
                std::iter::once(&i.digest)
                    .chain([&i.config])
                    .chain(&i.layers)
            })
            .collect();
        for d in std::iter::once(&record.digest)
            .chain([&record.config])
            .chain(&record.layers)
        {
            if !kept.contains(d) {
                let _ = fs::remove_file(self.blob_path(d));
            }
        }
        Ok(record)
    }
}

/// The unpacked root file system of the image whose config is `config`.
fn unpacked_root(config: &Digest) -> String {
    format!("{}.ext4", config.hex())
}

impl ImageRecord {
    /// The files under `roots/` its root is made of, topmost first.
    fn root_files(&self) -> Vec<String> {
        if self.roots.is_empty() {
            return vec![unpacked_root(&self.config)];
        }
        self.roots.clone()
    }
}

/// What an image's config says its processes run with: environment,
/// user and working directory (empty ones as none).
fn run_settings(config: &Config) -> (Vec<String>, Option<String>, Option<String>) {
    let c = &config.config;
    (
        c.env.clone().unwrap_or_default(),
        c.user.clone().filter(|u| !u.is_empty()),
        c.working_dir.clone().filter(|w| !w.is_empty()),
    )
}

/// `base`'s config with `new`'s environment and user.
fn derived_config(base_config: &[u8], base: &ImageRecord, new: &Derived) -> Result<Vec<u8>> {
    let mut config: serde_json::Value = serde_json::from_slice(base_config)
        .map_err(|e| ImageError::Malformed(format!("image {}: its config: {e}", base.name)))?;
    let mut vars: Vec<String> = config["config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for kv in &new.env {
        let key = kv.split('=').next().unwrap_or_default();
        vars.retain(|v| v.split('=').next() != Some(key));
        vars.push(kv.clone());
    }
    config["config"]["Env"] = vars.into();
    if let Some(u) = &new.user {
        config["config"]["User"] = u.as_str().into();
    }
    Ok(serde_json::to_vec(&config).unwrap_or_default())
}

/// Moves `from` to `to`, copying (holes kept) through `tmp` across file
/// systems.
fn move_file(from: &Path, to: &Path, tmp: &Path) -> Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        other => return other.at(|| format!("cannot move {} to {}", from.display(), to.display())),
    }
    let out = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(tmp)
        .output()
        .at(|| "cannot run cp".into())?;
    if !out.status.success() {
        let _ = fs::remove_file(tmp);
        return Err(ImageError::Tool {
            what: format!("copy {} into the image store", from.display()),
            tool: "cp",
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    fs::rename(tmp, to).at(|| format!("cannot store {}", to.display()))?;
    fs::remove_file(from).at(|| format!("cannot remove {}", from.display()))
}

/// A layer's tar stream, whatever it was compressed with.
fn decompress(mut file: File, digest: &Digest) -> Result<Box<dyn Read>> {
    let mut magic = [0u8; 4];
    let n = file
        .read(&mut magic)
        .at(|| format!("cannot read layer {digest}"))?;
    let head = std::io::Cursor::new(magic[..n].to_vec());
    let stream = head.chain(file);
    match magic {
        [0x1f, 0x8b, ..] => Ok(Box::new(flate2::read::MultiGzDecoder::new(stream))),
        [0x28, 0xb5, 0x2f, 0xfd] => malformed!(
            "layer {digest} is zstd-compressed, which sbx cannot unpack yet; rebuild or push the image with gzip layers"
        ),
        _ => Ok(Box::new(stream)),
    }
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `sha256:0123456789ab` (enough to tell layers apart in progress lines).
pub fn short(d: &Digest) -> String {
    format!("sha256:{}", &d.hex()[..12])
}

/// `n thing` or `n things`.
pub fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// A byte count for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
