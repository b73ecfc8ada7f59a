//! A session's disks when its root is an image: the image's read-only
//! root file system, shared by every session made from it, the layers a
//! template's build saved over it (read-only too), and the session's own
//! writable layer, a sparse ext4 file that overlayfs joins over them all
//! in the guest. The layer outlives the VM (it is the session's disk)
//! until the session is removed.

use std::path::{Path, PathBuf};
use std::process::Command;

use sbx_image::{ImageRecord, Store};
use sbx_protocol::cmdline::Root;
use vmm::devices::virtio::block::BlockConfig;

use crate::error::{fail, At, Error, Result};
use crate::paths;
use crate::spec::RootSpec;

/// The serials the guest finds its disks by.
pub const IMAGE_SERIAL: &str = "sbx-image";
pub const LAYER_SERIAL: &str = "sbx-layer";
/// Saved layer N's serial is this and N.
const SAVED_SERIAL: &str = "sbx-saved";

/// The writable layer's size when neither the spec nor the policy says.
pub const DEFAULT_LAYER_SIZE: u64 = 8 << 30;

/// The image store under the cache directory.
pub fn image_store() -> Result<Store> {
    Store::open(&paths::cache_dir().join("images")).map_err(Error::Image)
}

/// The image `name` names, as a session's root.
pub fn resolve(name: &str, layer_size: Option<u64>) -> Result<RootSpec> {
    let store = image_store()?;
    let record: ImageRecord = store.find(name).map_err(Error::Image)?;
    let mut roots = store.root_paths(&record);
    let path = roots.pop().unwrap_or_default();
    Ok(RootSpec {
        image: record.name.clone(),
        digest: record.digest.to_string(),
        path,
        saved: roots,
        layer_size,
        env: record.env.clone(),
    })
}

/// Where session `name`'s writable layer lives.
pub fn layer_path(name: &str) -> PathBuf {
    paths::state_dir()
        .join("disks")
        .join(format!("{name}.ext4"))
}

/// Deletes session `name`'s writable layer, if it has one.
pub fn remove_layer(name: &str) -> Result<()> {
    match std::fs::remove_file(layer_path(name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).at(|| format!("cannot remove {}", layer_path(name).display()))
        }
        _ => Ok(()),
    }
}

/// The layer at `path`, made (sparse, formatted) if it does not exist yet.
fn ensure_layer(path: &Path, size: u64) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).at(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("partial");
    let made = (|| {
        let f = std::fs::File::create(&tmp).at(|| format!("cannot create {}", tmp.display()))?;
        f.set_len(size)
            .at(|| format!("cannot size {} to {size} bytes", tmp.display()))?;
        // Lazy init: the guest's kernel zeroes inode tables in the
        // background instead of this writing them all now.
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-L", LAYER_SERIAL])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
            .arg(&tmp)
            .output()
            .at(|| "cannot run mkfs.ext4 (install e2fsprogs)".into())?;
        if !out.status.success() {
            fail!(
                Session,
                "mkfs.ext4 could not format the session's disk {}: {}",
                tmp.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::rename(&tmp, path).at(|| format!("cannot create {}", path.display()))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// The writable layer's size: as asked, else the default within the
/// policy's `disk_mib` (whether an asked size is within it, the session
/// asks the policy).
pub fn layer_size(root: &RootSpec, policy: &sbx_policy::Policy) -> u64 {
    let limit = policy.disk_limit().map(|(mib, _)| mib << 20);
    root.layer_size
        .unwrap_or_else(|| limit.map_or(DEFAULT_LAYER_SIZE, |l| l.min(DEFAULT_LAYER_SIZE)))
}

/// The block devices for `root` (its layer `size` bytes) and what the
/// guest is told of them.
pub fn devices(name: &str, root: &RootSpec, size: u64) -> Result<(Vec<BlockConfig>, Root)> {
    for path in root.saved.iter().chain([&root.path]) {
        if !path.is_file() {
            fail!(
                Invalid,
                "the root file system of image {} ({}) is missing; pull or import the image again (or build its template again)",
                root.image,
                path.display()
            );
        }
    }
    let layer = layer_path(name);
    ensure_layer(&layer, size)?;
    let saved: Vec<String> = (0..root.saved.len())
        .map(|i| format!("{SAVED_SERIAL}{i}"))
        .collect();
    let mut disks: Vec<BlockConfig> = root
        .saved
        .iter()
        .zip(&saved)
        .map(|(path, serial)| BlockConfig {
            path: path.clone(),
            read_only: true,
            serial: serial.clone(),
        })
        .collect();
    disks.push(BlockConfig {
        path: root.path.clone(),
        read_only: true,
        serial: IMAGE_SERIAL.into(),
    });
    disks.push(BlockConfig {
        path: layer,
        read_only: false,
        serial: LAYER_SERIAL.into(),
    });
    let boot = Root {
        saved,
        image: IMAGE_SERIAL.into(),
        layer: Some(LAYER_SERIAL.into()),
    };
    Ok((disks, boot))
}
