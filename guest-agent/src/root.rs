//! A root file system from disks: the image's read-only disk, the layers
//! saved from earlier sessions (a template's build) over it, and the
//! session's writable layer over them all (overlayfs), made the root before
//! anything else runs. The agent stays PID 1: it moves the new root over
//! the initramfs (which cannot be pivoted away) and chroots into it, as
//! switch_root does, and runs from memory from then on.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use sbx_protocol::cmdline::{Root, SAVED_TREE};

use crate::init::mount;

/// Where the disks are mounted before the switch (in the initramfs, so
/// they vanish from view with it).
const IMAGE: &str = "/sbx/image";
/// Saved layer N is mounted at `/sbx/saved/N`.
const SAVED: &str = "/sbx/saved";
const LAYER: &str = "/sbx/layer";
const NEW_ROOT: &str = "/sbx/root";
/// Mounts the initramfs already has that move into the new root.
const CARRIED: [&str; 5] = ["/dev", "/proc", "/sys", "/run", "/tmp"];

/// The block device whose virtio serial is `serial`.
fn disk_by_serial(serial: &str) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir("/sys/block").map_err(|e| format!("/sys/block: {e}"))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let read = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if read.trim_end_matches(['\0', '\n']) == serial {
            return Ok(Path::new("/dev").join(name));
        }
    }
    Err(format!(
        "no disk with serial {serial} (the host attaches it)"
    ))
}

/// Makes `root` the root file system; on failure nothing has moved.
pub fn switch(root: &Root) -> Result<(), String> {
    let image = disk_by_serial(&root.image)?;
    let image = image.to_string_lossy();
    // `noload`: the image is read-only and has no journal to replay.
    let ro = libc::MS_RDONLY | libc::MS_NODEV;
    if !mount(&image, IMAGE, "ext4", ro, "noload") {
        return Err(format!("cannot mount the image disk {image}"));
    }
    // overlayfs's lowerdir lists the topmost first, as `root.saved` does.
    let mut lower = Vec::new();
    for (i, serial) in root.saved.iter().enumerate() {
        let disk = disk_by_serial(serial)?;
        let disk = disk.to_string_lossy();
        let at = format!("{SAVED}/{i}");
        // The host's e2fsck replayed its journal when it saved it.
        if !mount(&disk, &at, "ext4", ro, "noload") {
            return Err(format!("cannot mount the saved layer {disk}"));
        }
        lower.push(format!("{at}/{SAVED_TREE}"));
    }
    lower.push(IMAGE.to_string());
    match &root.layer {
        Some(serial) => {
            let layer = disk_by_serial(serial)?;
            let layer = layer.to_string_lossy();
            if !mount(&layer, LAYER, "ext4", libc::MS_NODEV, "") {
                return Err(format!("cannot mount the writable layer {layer}"));
            }
        }
        // No disk: the writes live in RAM and go with the VM.
        None => {
            if !mount("tmpfs", LAYER, "tmpfs", libc::MS_NODEV, "mode=0755") {
                return Err("cannot mount a RAM layer".into());
            }
        }
    }
    let (upper, work) = (format!("{LAYER}/upper"), format!("{LAYER}/work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {d}: {e}"))?;
    }
    let data = format!(
        "lowerdir={},upperdir={upper},workdir={work}",
        lower.join(":")
    );
    if !mount("overlay", NEW_ROOT, "overlay", 0, &data) {
        return Err("cannot join the writable layer over the image".into());
    }
    for m in CARRIED {
        let target = format!("{NEW_ROOT}{m}");
        let _ = std::fs::create_dir_all(&target);
        move_mount(m, &target)?;
    }
    std::env::set_current_dir(NEW_ROOT).map_err(|e| format!("chdir {NEW_ROOT}: {e}"))?;
    move_mount(".", "/")?;
    let dot = CString::new(".").unwrap_or_default();
    // SAFETY: chroot with a valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(format!("chroot: {}", std::io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    resolve_own_name();
    Ok(())
}

/// Images' /etc/hosts do not know the guest's host name, and sudo and
/// others stall or complain resolving it: add it (to the writable layer).
fn resolve_own_name() {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let known = hosts.lines().any(|l| {
        l.split_whitespace()
            .skip(1)
            .any(|n| n == crate::init::HOSTNAME)
    });
    if !known {
        let line = format!("127.0.1.1\t{}\n", crate::init::HOSTNAME);
        let added = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/etc/hosts")
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
        if let Err(e) = added {
            eprintln!("sbx-guest-agent: cannot add the host name to /etc/hosts: {e}");
        }
    }
}

fn move_mount(from: &str, to: &str) -> Result<(), String> {
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (f, t) = (c(from), c(to));
    // SAFETY: valid NUL-terminated paths; MS_MOVE takes no type or data.
    let rc = unsafe {
        libc::mount(
            f.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot move {from} to {to}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
