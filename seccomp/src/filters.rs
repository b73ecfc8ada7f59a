//! What each kind of session thread may call: every thread gets `BASE`,
//! then its kind's own calls. Arguments are checked where they decide what
//! a call can do: ioctl numbers, socket families, new executable memory,
//! clone flags, signals sent.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::Kind;

pub(crate) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Every thread: memory (never new executable memory), locks, time, its
/// own signals, its own end, logging to descriptors it already holds.
const BASE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
];

/// Reading, polling and waking: every thread that waits on descriptors.
const WAIT: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_lseek,
    libc::SYS_fstat,
];

/// Unix sockets: accepting, connecting, passing descriptors.
const UNIX_SOCKETS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_socketpair,
];

/// Network sockets beyond Unix ones: the egress proxy, remote MCP
/// servers, shipping to the control plane (name resolution included).
const NETWORK: &[i64] = &[libc::SYS_sendmmsg, libc::SYS_recvmmsg, libc::SYS_uname];

/// The session's own files: its state directory, the audit log, the
/// tool pins (Landlock bounds where).
const STATE_FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_getdents64,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_flock,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
];

/// The passthrough behind a virtio-fs share: every file operation a guest
/// can ask for, beneath the share's root (the guard and Landlock bound
/// where), plus the watch on what the guest knows.
const SHARE_FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fchdir,
    libc::SYS_chdir,
    libc::SYS_flock,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_umask,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
];

/// A disk: requests to its image file.
const DISK_FILE: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
];

/// A vCPU beyond KVM_RUN: the console's writes (and its audit records,
/// whose append cuts a line a full disk left half written), and
/// activating a device: its eventfds and its worker's epoll.
const VCPU: &[i64] = &[
    libc::SYS_read,
    libc::SYS_ftruncate,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_lseek,
    libc::SYS_fstat,
];

/// The event loop beyond waiting: its signals and timer, ending helpers,
/// and how much guest memory was touched (at the end).
const EVENT_LOOP: &[i64] = &[
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigaction,
    libc::SYS_signalfd4,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_mincore,
];

/// A share's watch: inotify on the host directories the guest knows,
/// opened beneath the share's root.
const HOST_WATCH: &[i64] = &[
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_readlinkat,
];

// The ioctl numbers a thread may use. KVM's are _IO/_IOW/_IOR(0xAE, nr,
// size), written out because kvm-ioctls keeps its own private.
const KVM_RUN: u64 = 0xAE80;
const KVM_IRQ_LINE: u64 = 0x4008_AE61;
const KVM_IRQFD: u64 = 0x4020_AE76;
const KVM_IOEVENTFD: u64 = 0x4040_AE79;
const KVM_GET_REGS: u64 = 0x8090_AE81;
const KVM_GET_SREGS: u64 = 0x8138_AE83;
const KVM_KVMCLOCK_CTRL: u64 = 0xAEAD;
/// std's `set_nonblocking` and reading what is queued.
const SOCKET_IOCTLS: &[u64] = &[libc::FIONBIO, libc::FIONREAD];
/// Whether a descriptor is a terminal (logging's colour choice).
const TCGETS: u64 = libc::TCGETS;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .expect("argument indices here are below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("every rule here has a condition")
}

fn allow(rules: &mut Rules, calls: &[i64]) {
    for &c in calls {
        rules.insert(c, Vec::new());
    }
}

/// Allows `call` when `arg` equals one of `values` (a no-op for a call
/// already allowed outright).
fn allow_values(rules: &mut Rules, call: i64, arg: u8, values: &[u64]) {
    if rules.get(&call).is_some_and(Vec::is_empty) {
        return;
    }
    let list = rules.entry(call).or_default();
    list.extend(
        values
            .iter()
            .map(|&v| rule(vec![cond(arg, SeccompCmpOp::Eq, v)])),
    );
}

/// Allows `call` when the bits of `mask` in `arg` equal `value`.
fn allow_masked(rules: &mut Rules, call: i64, arg: u8, mask: u64, value: u64) {
    if rules.get(&call).is_some_and(Vec::is_empty) {
        return;
    }
    rules
        .entry(call)
        .or_default()
        .push(rule(vec![cond(arg, SeccompCmpOp::MaskedEq(mask), value)]));
}

fn base() -> Rules {
    let mut r = Rules::new();
    allow(&mut r, BASE);
    // Memory, never executable: no thread loads code after it starts.
    let exec = libc::PROT_EXEC as u64;
    allow_masked(&mut r, libc::SYS_mmap, 2, exec, 0);
    allow_masked(&mut r, libc::SYS_mprotect, 2, exec, 0);
    // A panic aborts the process (SIGABRT to itself); nothing else.
    allow_values(&mut r, libc::SYS_tgkill, 2, &[libc::SIGABRT as u64]);
    allow_values(&mut r, libc::SYS_ioctl, 1, &[TCGETS]);
    r
}

fn sockets(r: &mut Rules, families: &[libc::c_int]) {
    allow(r, UNIX_SOCKETS);
    let families: Vec<u64> = families.iter().map(|&f| f as u64).collect();
    allow_values(r, libc::SYS_socket, 0, &families);
    allow_values(r, libc::SYS_ioctl, 1, SOCKET_IOCTLS);
}

/// Starting threads: clone only with CLONE_THREAD (a thread of this
/// process, never a new one); clone3's flags are in memory seccomp cannot
/// read, so it is allowed only to the threads that start others. A new
/// thread runs under its parent's filter until it installs its own, so the
/// parent's allows naming a thread and adding a filter (which only ever
/// narrows what a thread may do).
fn threads(r: &mut Rules) {
    let thread = libc::CLONE_THREAD as u64;
    allow_masked(r, libc::SYS_clone, 0, thread, thread);
    allow(r, &[libc::SYS_clone3]);
    allow_values(
        r,
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
    );
    allow_values(
        r,
        libc::SYS_seccomp,
        0,
        &[libc::SECCOMP_SET_MODE_FILTER as u64],
    );
}

/// The rules of one kind of thread.
pub(crate) fn rules(kind: Kind) -> Rules {
    let mut r = base();
    match kind {
        Kind::Vcpu => {
            // Guest code runs here: KVM_RUN, the interrupt lines of the
            // legacy devices, device activation (eventfds, the irqfd and
            // ioeventfd of a queue, the worker's epoll), telling KVM the
            // guest was paused, and a register dump when the guest fails.
            // Device threads are started by the spawner.
            allow_values(
                &mut r,
                libc::SYS_ioctl,
                1,
                &[
                    KVM_RUN,
                    KVM_IRQ_LINE,
                    KVM_IRQFD,
                    KVM_IOEVENTFD,
                    KVM_GET_REGS,
                    KVM_GET_SREGS,
                    KVM_KVMCLOCK_CTRL,
                ],
            );
            allow(&mut r, VCPU);
        }
        Kind::EventLoop => {
            // The main thread: waits on the VM's events and signals, kicks
            // vCPUs out of KVM_RUN, then takes the session down (its
            // state files, the audit log's last records, ending helpers).
            allow(&mut r, WAIT);
            allow(&mut r, STATE_FILES);
            allow(&mut r, EVENT_LOOP);
            allow_values(&mut r, libc::SYS_tgkill, 2, &[libc::SIGRTMIN() as u64]);
            sockets(&mut r, &[libc::AF_UNIX]);
        }
        Kind::Vsock => {
            allow(&mut r, WAIT);
            sockets(&mut r, &[libc::AF_UNIX]);
        }
        Kind::Fs => {
            allow(&mut r, WAIT);
            allow(&mut r, SHARE_FILES);
        }
        Kind::FsWatch => {
            allow(&mut r, WAIT);
            allow(&mut r, HOST_WATCH);
        }
        Kind::Block => {
            allow(&mut r, WAIT);
            allow(&mut r, DISK_FILE);
        }
        // Its queue and getrandom (in the base list): nothing on the host.
        Kind::Rng => allow(&mut r, WAIT),
        Kind::Events | Kind::Control | Kind::HostEdits => {
            // The guest's reports and `sbx exec` requests: Unix sockets,
            // the audit log and the session's state. The accepting threads
            // start one of their own kind per connection.
            allow(&mut r, WAIT);
            allow(&mut r, STATE_FILES);
            sockets(&mut r, &[libc::AF_UNIX]);
            if kind != Kind::HostEdits {
                threads(&mut r);
            }
        }
        Kind::Egress | Kind::Mcp | Kind::Ship => {
            // The network, named and resolved; the audit log; for MCP,
            // servers' sessions through their control sockets and the
            // tool pins. Each starts threads of its own kind: the proxy one
            // per connection, the gateway's and the shipper's HTTP clients
            // tokio's.
            allow(&mut r, WAIT);
            allow(&mut r, STATE_FILES);
            allow(&mut r, NETWORK);
            sockets(
                &mut r,
                &[
                    libc::AF_UNIX,
                    libc::AF_INET,
                    libc::AF_INET6,
                    libc::AF_NETLINK,
                ],
            );
            threads(&mut r);
        }
        Kind::Audit => {
            allow(&mut r, WAIT);
            allow(&mut r, STATE_FILES);
        }
        Kind::Report => {
            // Reads what the trap handler wrote, records it, ends the
            // process.
            allow(&mut r, WAIT);
            allow(&mut r, STATE_FILES);
            allow(&mut r, &[libc::SYS_alarm]);
        }
        Kind::Spawn => {
            // Starts every session thread after the first filter, so that
            // none inherits a narrower filter than its own: it may call
            // what any of them may, and runs none of their code.
            for k in Kind::ALL {
                if k != Kind::Spawn {
                    union(&mut r, rules(k));
                }
            }
            threads(&mut r);
        }
    }
    r
}

/// Adds `other`'s calls to `into`: a call allowed outright by either is
/// allowed outright; otherwise either's conditions allow it.
fn union(into: &mut Rules, other: Rules) {
    for (call, conds) in other {
        match into.get_mut(&call) {
            Some(mine) if mine.is_empty() => {}
            Some(mine) if conds.is_empty() => mine.clear(),
            Some(mine) => {
                for c in conds {
                    if !mine.contains(&c) {
                        mine.push(c);
                    }
                }
            }
            None => {
                into.insert(call, conds);
            }
        }
    }
}
