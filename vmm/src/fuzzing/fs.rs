//! FUSE requests through a share's guard to a real host directory, driven
//! by a script: requests built from a chosen opcode, node, handle, fixed
//! fields and names picked from the share's own, or raw bytes; reply
//! buffers of chosen sizes; raw chains and pokes. What the guard promises
//! the host is checked after every input:
//! - nothing outside the share changes (a symlink in it points there);
//! - the bytes of denied files (`.env`, anything under `.ssh/`, and the
//!   file outside) never reach guest memory, by any route;
//! - the share holds only directories, regular files and symlinks, none
//!   setuid or setgid, no symlink with an absolute target, and no more
//!   disk than the share's quota allows.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use fuse_backend_rs::api::server::Server;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::script::Script;
#[cfg(test)]
use super::script::Writer;
use super::{guest_memory, raw_chain, Heap, ProcessDir, MEM_LEN, RING_BASE};
use crate::devices::virtio::answer_all;
use crate::devices::virtio::fs::{
    answer, file_system, Change, FsAccess, FsCache, FsConfig, FsSupervisor, Guard, Refusal,
    RuleRef, ShareQuota, WatchBudget,
};
use crate::devices::virtio::test_ring::{Ring, WRITE};
use crate::devices::virtio::Interrupt;
use crate::vstate::memory::GuestMemory;

/// Bytes the guest may add to the share in one input.
const QUOTA: u64 = 1 << 20;
/// FUSE opcodes a script picks from by index (anything past is raw).
const OPCODES: [u32; 46] = [
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25, 26, 27, 28,
    29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 42, 43, 44, 45, 46, 47, 50, 51,
];
const INIT: u32 = 26;
/// Names a request picks from: the share's own, new ones, and ones the
/// guard must refuse.
const NAMES: [&str; 14] = [
    "readme.txt",
    "src",
    "main.rs",
    ".env",
    ".ssh",
    "id",
    "escape",
    "new",
    "dir",
    "..",
    ".",
    "a/b",
    "",
    "copy",
];

/// Denies `.env` files and everything under `.ssh/`; refuses every link
/// out of the share.
struct Supervisor;

fn refusal(id: &str) -> Refusal {
    Refusal {
        rule: RuleRef {
            id: id.into(),
            layer: "fuzz".into(),
            location: None,
        },
        reason: id.into(),
    }
}

impl FsSupervisor for Supervisor {
    fn check(&self, path: &str, _access: FsAccess) -> Option<Refusal> {
        (path.ends_with("/.env") || path.contains("/.ssh/")).then(|| refusal("secrets"))
    }
    fn denied(&self, _op: &str, _path: &str, _refusal: &Refusal) {}
    fn changed(&self, _change: Change, _path: &str) {}
    fn leaving_link(&self, _path: &str, _target: &str) -> Option<Refusal> {
        Some(refusal("no-leaving-links"))
    }
}

/// A fresh secret for each input: the fuzzer never sees it, so it cannot
/// learn to write it into the share and read it back.
fn secret() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ N
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{x:016x}")
        })
        .collect()
}

/// Lays out the share and the directory beside it.
fn fixture(root: &Path, secret: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(root);
    let (share, outside) = (root.join("share"), root.join("outside"));
    std::fs::create_dir_all(share.join("src"))?;
    std::fs::create_dir_all(share.join(".ssh"))?;
    std::fs::create_dir_all(&outside)?;
    std::fs::write(share.join("readme.txt"), "hello\n")?;
    std::fs::write(share.join("src/main.rs"), "fn main() {}\n")?;
    std::fs::write(share.join(".env"), secret)?;
    std::fs::write(share.join(".ssh/id"), secret)?;
    std::fs::write(outside.join("canary"), secret)?;
    std::fs::set_permissions(
        outside.join("canary"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    std::os::unix::fs::symlink("../outside/canary", share.join("escape"))
}

/// Whether `needle` is in `hay` (glibc's memmem: all of guest memory is
/// scanned after every input).
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    // SAFETY: both pointers and lengths come from live slices; memmem only
    // reads them.
    let found = unsafe {
        libc::memmem(
            hay.as_ptr().cast(),
            hay.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    };
    !found.is_null()
}

/// Plays one script: its first byte says whether the share is read-only
/// and how much the guest may cache.
pub fn fs_requests(data: &[u8]) {
    static DIR: OnceLock<ProcessDir> = OnceLock::new();
    let root = DIR.get_or_init(|| ProcessDir::new("fs")).0.join("fixture");
    let secret = secret();
    fixture(&root, &secret).expect("cannot lay out the fuzzed share");

    let mut s = Script::new(data);
    let setup = s.u8();
    let config = FsConfig {
        tag: "fuzz".into(),
        host_dir: root.join("share"),
        guest_path: "/workspace".into(),
        read_only: setup & 1 == 1,
        mount_rule: RuleRef::guard(),
        cache: if setup & 2 == 0 {
            FsCache::Never
        } else {
            FsCache::Always
        },
        supervisor: Arc::new(Supervisor),
        watches: WatchBudget::new(0),
        quota: Some(ShareQuota::new(QUOTA)),
    };
    let server = Server::new(Arc::new(
        file_system(&config).expect("cannot open the fuzzed share"),
    ));
    let mem = guest_memory();
    let mut ring = Ring::at(RING_BASE);
    let mut queue = ring.queue();
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    let mut heap = Heap::new();
    let mut unique = 0u64;

    let mut send = |ring: &mut Ring, queue: &mut Queue, msg: &[u8], reply_len: u32| {
        let req = heap.put(&mem, msg);
        let reply = heap.alloc(u64::from(reply_len));
        ring.post(
            &mem,
            &[(req, msg.len() as u32, 0), (reply, reply_len, WRITE)],
        );
        serve(&server, &mem, queue, &irq);
        let mut got = vec![0u8; reply_len.min((MEM_LEN - reply) as u32) as usize];
        let _ = mem.read_slice(&mut got, GuestAddress(reply));
        assert!(
            !contains(&got, secret.as_bytes()),
            "a denied file's bytes reached the guest"
        );
    };
    send(&mut ring, &mut queue, &init(), 4096);

    while !s.ended() {
        match s.u8() % 4 {
            0 | 1 => {
                unique += 1;
                let msg = message(&mut s, unique);
                let reply_len = [4096, 0, 16, 65536][usize::from(s.u8() % 4)];
                send(&mut ring, &mut queue, &msg, reply_len);
            }
            2 => {
                let descs = raw_chain(&mut s, 3);
                ring.post(&mem, &descs);
                serve(&server, &mem, &mut queue, &irq);
            }
            _ => {
                let at = s.addr(MEM_LEN);
                let _ = mem.write_slice(s.blob(false), GuestAddress(at));
            }
        }
    }
    drop(server);

    let mut all = vec![0u8; MEM_LEN as usize];
    mem.read_slice(&mut all, GuestAddress(0))
        .expect("guest memory is 1 MiB");
    assert!(
        !contains(&all, secret.as_bytes()),
        "a denied file's bytes reached guest memory"
    );
    check_outside(&root.join("outside"), &secret);
    let grown = check_share(&root.join("share"));
    assert!(
        grown <= QUOTA + 64 * 1024,
        "the share grew by {grown} bytes"
    );
}

fn serve(server: &Server<Arc<Guard>>, mem: &GuestMemory, queue: &mut Queue, irq: &Interrupt) {
    answer_all("fuzz", mem, queue, irq, |chain| answer(server, mem, chain));
}

/// A FUSE request header: len, opcode, unique, nodeid, uid, gid, pid, pad.
fn header(len: usize, opcode: u32, unique: u64, node: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    h.extend((len as u32 + 40).to_le_bytes());
    h.extend(opcode.to_le_bytes());
    h.extend(unique.to_le_bytes());
    h.extend(node.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h.extend(1u32.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h
}

/// FUSE_INIT as Linux 6.1 sends it (7.38, no flags beyond the basics).
fn init() -> Vec<u8> {
    let mut body = Vec::new();
    for v in [7u32, 38, 128 * 1024, 0, 0] {
        body.extend(v.to_le_bytes());
    }
    body.resize(64, 0);
    [header(body.len(), INIT, 0, 0), body].concat()
}

/// One request: opcode, node, then a fixed part and names (each ends in
/// NUL), or a raw message.
fn message(s: &mut Script, unique: u64) -> Vec<u8> {
    let pick = s.u8();
    let Some(&opcode) = OPCODES.get(usize::from(pick)) else {
        return s.blob(true).to_vec();
    };
    let node = match s.u8() {
        n @ 0..=31 => u64::from(n),
        _ => s.u64(),
    };
    let mut body = s.blob(false).to_vec();
    for _ in 0..s.u8() % 3 {
        let name = match NAMES.get(usize::from(s.u8())) {
            Some(n) => n.as_bytes(),
            None => s.blob(false),
        };
        body.extend(name);
        body.push(0);
    }
    [header(body.len(), opcode, unique, node), body].concat()
}

fn check_outside(outside: &Path, secret: &str) {
    let names: Vec<_> = std::fs::read_dir(outside)
        .expect("the directory beside the share is gone")
        .map(|e| e.expect("readdir").file_name())
        .collect();
    assert_eq!(
        names,
        [OsStr::new("canary")],
        "the guest changed a host directory outside the share"
    );
    let canary = outside.join("canary");
    assert_eq!(
        std::fs::read_to_string(&canary).ok().as_deref(),
        Some(secret),
        "the guest changed a host file outside the share"
    );
    let mode = std::fs::metadata(&canary)
        .expect("canary")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o7777,
        0o644,
        "the guest changed a host file's mode outside the share"
    );
}

/// Checks every entry in the share; returns the bytes its files take on disk.
fn check_share(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("readdir of the share") {
        let entry = entry.expect("readdir entry");
        let path = entry.path();
        let md = std::fs::symlink_metadata(&path).expect("lstat");
        let kind = md.file_type();
        assert!(
            md.mode() & (libc::S_ISUID | libc::S_ISGID) == 0,
            "{} is setuid or setgid",
            path.display()
        );
        if kind.is_symlink() {
            let target = std::fs::read_link(&path).expect("readlink");
            assert!(
                !target.is_absolute(),
                "{} points at {}",
                path.display(),
                target.display()
            );
        } else if kind.is_dir() {
            total += check_share(&path);
        } else {
            assert!(kind.is_file(), "{} is a special file", path.display());
            // Disk the file takes: a sparse file's length costs nothing.
            total += md.blocks() * 512;
        }
    }
    total
}

#[cfg(test)]
pub(super) fn seeds() -> Vec<Vec<u8>> {
    // opcode index in OPCODES, node, fixed part, names (index into NAMES).
    let msg = |w: &mut Writer, op: u32, node: u8, fixed: &[u8], names: &[u8], reply: u8| {
        let i = OPCODES
            .iter()
            .position(|o| *o == op)
            .expect("a known opcode") as u8;
        w.u8(0)
            .u8(i)
            .u8(node)
            .blob(false, fixed)
            .u8(names.len() as u8);
        for n in names {
            w.u8(*n);
        }
        w.u8(reply);
    };
    let le = |vs: &[u64]| -> Vec<u8> { vs.iter().flat_map(|v| v.to_le_bytes()).collect() };
    // fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, pad.
    let read_in = |fh: u64, size: u64| [le(&[fh, 0, size]), vec![0; 16]].concat();
    // fuse_setattr_in with FATTR_MODE: the mode is at byte 68 of 88.
    let mut setattr = vec![0u8; 88];
    setattr[0] = 1;
    setattr[68..72].copy_from_slice(&0o104755u32.to_le_bytes());
    let mut seeds = Vec::new();
    for setup in [0u8, 1, 2] {
        let mut w = Writer::default();
        w.u8(setup);
        // LOOKUP each name, GETATTR, OPENDIR + READDIRPLUS of the root.
        for n in 0..8 {
            msg(&mut w, 1, 1, b"", &[n], 0);
        }
        msg(&mut w, 3, 2, &[0; 16], &[], 0);
        msg(&mut w, 27, 1, &[0; 8], &[], 0);
        msg(&mut w, 44, 1, &read_in(1, 4096), &[], 0);
        // OPEN node 2 and READ it; CREATE "new" and WRITE to it.
        msg(&mut w, 14, 2, &[0; 8], &[], 0);
        msg(&mut w, 15, 2, &read_in(2, 1024), &[], 0);
        msg(&mut w, 35, 1, &le(&[2 | (0o100644 << 32), 0o22]), &[7], 0);
        msg(
            &mut w,
            16,
            6,
            &[read_in(3, 5), b"hello".to_vec()].concat(),
            &[],
            0,
        );
        // MKDIR, SYMLINK (name, then target), LINK .env, RENAME, UNLINK.
        msg(&mut w, 9, 1, &le(&[0o755 | (0o22 << 32)]), &[8], 0);
        msg(&mut w, 6, 1, b"", &[13, 6], 0);
        msg(&mut w, 13, 1, &le(&[4]), &[13], 0);
        msg(&mut w, 12, 1, &le(&[1]), &[0, 13], 0);
        msg(&mut w, 10, 1, b"", &[13], 0);
        // SETATTR to a setuid mode, FALLOCATE a gigabyte, MKNOD a FIFO.
        msg(&mut w, 4, 2, &setattr, &[], 0);
        msg(
            &mut w,
            43,
            6,
            &[le(&[3, 0, 1 << 30]), vec![0; 8]].concat(),
            &[],
            0,
        );
        msg(&mut w, 8, 1, &le(&[0o10644, 0]), &[7], 0);
        seeds.push(w.0);
    }
    seeds
}
