//! What a session process keeps of root: only the capabilities its shares
//! need to act for the guest's users on the host (owners, modes, device
//! nodes, files whatever their mode), never the rest (mounting, tracing,
//! raw sockets, modules, the clock, rebooting); and no-new-privs, so that
//! nothing it starts can gain any. Done before its first thread starts,
//! since capabilities belong to each thread and threads copy their
//! parent's.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The capabilities a session keeps (from `linux/capability.h`), by name.
pub const KEPT: [(u32, &str); 8] = [
    (0, "chown"),
    (1, "dac_override"),
    (2, "dac_read_search"),
    (3, "fowner"),
    (4, "fsetid"),
    (6, "setgid"),
    (7, "setuid"),
    (27, "mknod"),
];

const CAP_SETPCAP: u32 = 8;
/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What [`drop_privileges`] did, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// The capabilities the process still has (none for an ordinary user).
    pub kept: Vec<&'static str>,
    /// How many of its capabilities it gave up (in every set, the bounding
    /// set included).
    pub dropped: u32,
}

static DONE: OnceLock<Dropped> = OnceLock::new();

fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |m, (c, _)| m | 1u64 << c)
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn get() -> std::io::Result<[Data; 2]> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` words for version 3 into `data`.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(data)
}

fn join(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | u64::from(hi) << 32
}

/// Sets no-new-privs, and keeps only [`KEPT`] of the capabilities this
/// process has, in every set including the bounding set.
pub fn drop_privileges() -> Result<&'static Dropped> {
    let fail = |what: &str, e: std::io::Error| {
        Error::Session(format!(
            "cannot drop the session process's privileges ({what}): {e}"
        ))
    };
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(fail("no-new-privs", std::io::Error::last_os_error()));
    }
    let before = get().map_err(|e| fail("capget", e))?;
    let permitted = join(before[0].permitted, before[1].permitted);
    let keep = permitted & kept_mask();
    if permitted >> CAP_SETPCAP & 1 == 1 {
        for cap in 0..=last_cap() {
            if kept_mask() >> cap & 1 == 1 {
                continue;
            }
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                return Err(fail("bounding set", std::io::Error::last_os_error()));
            }
        }
    }
    // SAFETY: prctl with integer arguments only; clearing needs no privilege.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let word = |i: u32| (keep >> (32 * i)) as u32;
    let data = [0, 1].map(|i| Data {
        effective: word(i),
        permitted: word(i),
        inheritable: 0,
    });
    // SAFETY: capset reads the header and two `Data` words.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(fail("capset", std::io::Error::last_os_error()));
    }
    let done = Dropped {
        kept: KEPT
            .iter()
            .filter(|(c, _)| keep >> c & 1 == 1)
            .map(|(_, n)| *n)
            .collect(),
        dropped: (permitted & !keep).count_ones(),
    };
    Ok(DONE.get_or_init(|| done))
}

/// What was dropped, once [`drop_privileges`] ran.
pub fn dropped() -> Option<&'static Dropped> {
    DONE.get()
}

/// This process's effective capabilities, as a mask.
pub fn effective() -> std::io::Result<u64> {
    let d = get()?;
    Ok(join(d[0].effective, d[1].effective))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_share_capabilities_are_kept() {
        let m = kept_mask();
        assert_eq!(m.count_ones() as usize, KEPT.len());
        // Never mounting, tracing, raw sockets, modules or setpcap.
        for cap in [21, 19, 13, 16, 8, 12, 17] {
            assert_eq!(m >> cap & 1, 0, "capability {cap} is kept");
        }
    }

    #[test]
    fn a_thread_drops_to_the_kept_set() {
        // In a thread of its own: capabilities are per thread, and the
        // test process's other threads keep theirs.
        let eff = std::thread::spawn(|| {
            drop_privileges().unwrap();
            effective().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(eff & !kept_mask(), 0, "effective {eff:#x}");
        assert_eq!(
            effective().unwrap() & 1 << 21 != 0,
            root(),
            "this thread kept its own"
        );
    }

    fn root() -> bool {
        // SAFETY: geteuid has no arguments and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
}
