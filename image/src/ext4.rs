//! The read-only root file system of an image: ext4 without a journal,
//! made by `mke2fs -d` from the staged tree, then given each entry's
//! owner, exact mode, device numbers and extended attributes with
//! `debugfs`, which writes them into the file system directly. Neither
//! needs root, so an image converted by a normal user is owned as its
//! layers say.
//!
//! ext4 was chosen over EROFS because the guest kernel already carries
//! it, Debian 12's `mkfs.erofs` (1.5) cannot take ownership from a table,
//! and `e2fsprogs` is on every Debian host.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use crate::error::{At, ImageError, Result};
use crate::unpack::{staged, Kind, Tree};

const BLOCK: u64 = 4096;

/// Builds the file system image of `tree` at `out`; returns its size.
pub fn build(tree: &Tree, out: &Path, scratch: &Path) -> Result<u64> {
    let (bytes, inodes) = measure(tree.root())?;
    // Room for metadata (inode tables, bitmaps, directories' blocks) and
    // a margin, rounded to whole MiB.
    let size = (bytes + inodes * 512 + bytes / 10 + (32 << 20)).div_ceil(1 << 20) << 20;
    let inode_count = inodes + inodes / 5 + 1024;
    let out_str = out.to_string_lossy();
    let status = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
        .args([
            "-O",
            "^has_journal",
            "-L",
            "sbx-image",
            "-E",
            "root_owner=0:0",
        ])
        .args(["-N", &inode_count.to_string(), "-d"])
        .arg(tree.root())
        .arg(&*out_str)
        .arg(format!("{}k", size >> 10))
        .output();
    check_tool("mke2fs", "make the image's file system", status)?;

    let script = fixups(tree, scratch)?;
    if !script.is_empty() {
        let path = scratch.join("fixups.debugfs");
        std::fs::write(&path, script).at(|| format!("cannot write {}", path.display()))?;
        let out = Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&path)
            .arg(&*out_str)
            .output();
        let out = check_tool("debugfs", "set owners and modes in the image", out)?;
        // debugfs exits 0 whatever its commands did; its errors are the
        // stderr lines other than its banner.
        let errors: Vec<&str> = std::str::from_utf8(&out.stderr)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
            .collect();
        if !errors.is_empty() {
            return Err(ImageError::Tool {
                what: "set owners and modes in the image".into(),
                tool: "debugfs",
                detail: errors
                    .iter()
                    .take(5)
                    .copied()
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
    }
    Ok(size)
}

/// Makes the ext4 file system in `disk` consistent (its journal replayed,
/// anything a VM ended mid-write left fixed), as `e2fsck -fy` does.
pub fn repair(disk: &Path) -> Result<()> {
    let out = Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(disk)
        .output()
        .map_err(|e| ImageError::Tool {
            what: format!("check {}", disk.display()),
            tool: "e2fsck",
            detail: format!("{e} (install e2fsprogs)"),
        })?;
    // 0: clean; 1 and 2: errors were fixed; 4 and above: they were not.
    match out.status.code() {
        Some(0..=2) => Ok(()),
        _ => Err(ImageError::Tool {
            what: format!("check {}", disk.display()),
            tool: "e2fsck",
            detail: String::from_utf8_lossy(&out.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&out.stderr).lines())
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

fn check_tool(
    tool: &'static str,
    what: &str,
    out: std::io::Result<std::process::Output>,
) -> Result<std::process::Output> {
    let out = out.map_err(|e| ImageError::Tool {
        what: what.into(),
        tool,
        detail: format!("{e} (install e2fsprogs)"),
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            what: what.into(),
            tool,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Bytes of data (in whole blocks) and the number of entries under `root`.
fn measure(root: &Path) -> Result<(u64, u64)> {
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let entries = std::fs::read_dir(&dir).at(|| format!("cannot list {}", dir.display()))?;
        for e in entries {
            let e = e.at(|| format!("cannot list {}", dir.display()))?;
            let m = e
                .metadata()
                .at(|| format!("cannot stat {}", e.path().display()))?;
            inodes += 1;
            bytes += m.len().div_ceil(BLOCK) * BLOCK;
            if m.is_dir() {
                bytes += BLOCK;
                todo.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// The debugfs commands that make each entry what the table says, where
/// the staged file differs (as root, mostly nothing; as a user, owners).
fn fixups(tree: &Tree, scratch: &Path) -> Result<String> {
    let mut script = String::new();
    for (n, (key, meta)) in tree.entries().enumerate() {
        let host = tree.host(key);
        let Some((uid, gid, mode)) = staged(&host) else {
            continue;
        };
        let mut lines = Vec::new();
        let q = quote(key)?;
        let type_bits = match meta.kind {
            Kind::Dir => libc::S_IFDIR,
            Kind::File => libc::S_IFREG,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Special { kind: 'c', .. } => libc::S_IFCHR,
            Kind::Special { kind: 'b', .. } => libc::S_IFBLK,
            Kind::Special { .. } => libc::S_IFIFO,
        };
        let mut fix_mode = mode != meta.mode && meta.kind != Kind::Symlink;
        let (mut fix_uid, mut fix_gid) = (uid != meta.uid, gid != meta.gid);
        if let Kind::Special { kind, major, minor } = meta.kind {
            // debugfs's mknod makes its node in the current directory.
            let (parent, leaf) = key.rsplit_once('/').unwrap_or(("", key));
            let parent = if parent.is_empty() { "/" } else { parent };
            lines.push(format!("rm {q}"));
            lines.push(format!("cd {}", quote(parent)?));
            let leaf = quote(leaf)?;
            match kind {
                'p' => lines.push(format!("mknod {leaf} p")),
                k => lines.push(format!("mknod {leaf} {k} {major} {minor}")),
            }
            lines.push("cd /".into());
            (fix_mode, fix_uid, fix_gid) = (true, true, true);
        }
        if fix_mode {
            lines.push(format!("sif {q} mode 0{:o}", type_bits | meta.mode));
        }
        if fix_uid {
            lines.push(format!("sif {q} uid {}", meta.uid));
        }
        if fix_gid {
            lines.push(format!("sif {q} gid {}", meta.gid));
        }
        for (i, (name, value)) in meta.xattrs.iter().enumerate() {
            let file = scratch.join(format!("xattr-{n}-{i}"));
            std::fs::write(&file, value).at(|| format!("cannot write {}", file.display()))?;
            lines.push(format!(
                "ea_set -f {} {q} {}",
                quote(&file.to_string_lossy())?,
                quote(name)?
            ));
        }
        for l in lines {
            let _ = writeln!(script, "{l}");
        }
    }
    Ok(script)
}

/// A path as one debugfs argument.
fn quote(s: &str) -> Result<String> {
    if s.contains(['"', '\n']) {
        return Err(ImageError::Malformed(format!(
            "the image has a file named {s:?}; names with double quotes or newlines are not supported"
        )));
    }
    Ok(format!("\"{s}\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::debugfs;
    use crate::unpack::staged_mode;

    #[test]
    fn the_image_has_the_layers_owners_modes_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new(&dir.path().join("root")).unwrap();
        let tar = crate::testing::Layer::new()
            .dir("home/agent/", 0o750, 1000)
            .file("home/agent/a", 0o640, 1000, b"hello")
            .file("bin/su", 0o4755, 0, b"elf")
            .char_dev("dev/null", 0o666, 1, 3)
            .bytes();
        t.apply(&tar[..], "l").unwrap();
        // Staged without its setuid bit: only the image gets that.
        let su = t.meta_for_test("/bin/su");
        assert_eq!(staged(&t.host("/bin/su")).unwrap().2, staged_mode(&su));
        assert_ne!(staged_mode(&su), su.mode);
        let image = dir.path().join("root.ext4");
        build(&t, &image, dir.path()).unwrap();
        let a = debugfs(&image, "stat /home/agent/a");
        assert!(
            a.contains("User:  1000") && a.contains("Group:  1000"),
            "{a}"
        );
        assert!(a.contains("Mode:  0640"), "{a}");
        let su = debugfs(&image, "stat /bin/su");
        assert!(
            su.contains("Mode:  04755") && su.contains("User:     0"),
            "{su}"
        );
        let null = debugfs(&image, "stat /dev/null");
        assert!(null.contains("Type: character special"), "{null}");
        assert!(null.contains("Device major/minor number: 01:03"), "{null}");
        assert_eq!(debugfs(&image, "cat /home/agent/a"), "hello");
        let fsck = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
}
