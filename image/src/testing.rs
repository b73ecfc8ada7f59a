//! Layer tarballs for tests (this crate's, and the real-guest suite's):
//! entries with owners, modes, links and device nodes, as image layers
//! carry them.

use std::path::Path;

use tar::{EntryType, Header};

/// A layer being written; each call adds one entry.
pub struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(et: EntryType, mode: u32, uid: u64, size: usize) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(et);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_size(size as u64);
        h
    }

    /// A directory (`path` ends with `/`), owned by `uid` (and gid `uid`).
    pub fn dir(mut self, path: &str, mode: u32, uid: u64) -> Layer {
        let mut h = Layer::header(EntryType::Directory, mode, uid, 0);
        self.b
            .append_data(&mut h, path, &[][..])
            .expect("in memory");
        self
    }

    pub fn file(mut self, path: &str, mode: u32, uid: u64, body: &[u8]) -> Layer {
        let mut h = Layer::header(EntryType::Regular, mode, uid, body.len());
        self.b.append_data(&mut h, path, body).expect("in memory");
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Layer {
        let mut h = Layer::header(EntryType::Symlink, 0o777, 0, 0);
        self.b.append_link(&mut h, path, target).expect("in memory");
        self
    }

    /// A hard link to `target` (an earlier entry's path).
    pub fn hardlink(mut self, path: &str, target: &str) -> Layer {
        let mut h = Layer::header(EntryType::Link, 0o644, 0, 0);
        self.b.append_link(&mut h, path, target).expect("in memory");
        self
    }

    /// A character device node `major:minor`.
    pub fn char_dev(mut self, path: &str, mode: u32, major: u32, minor: u32) -> Layer {
        let mut h = Layer::header(EntryType::Char, mode, 0, 0);
        h.set_device_major(major).expect("fits");
        h.set_device_minor(minor).expect("fits");
        self.b
            .append_data(&mut h, path, &[][..])
            .expect("in memory");
        self
    }

    pub fn bytes(self) -> Vec<u8> {
        self.b.into_inner().expect("in memory")
    }

    /// Writes the layer to `path`.
    pub fn write(self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.bytes())
    }
}

/// What `debugfs -R CMD` prints about the file system image at `image`
/// (read-only: how tests look inside a root without mounting it).
pub fn debugfs(image: &Path, cmd: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .args(["-R", cmd])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
