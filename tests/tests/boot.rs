//! Real guests booted by `sbx boot`: vCPU counts, exit status, boot marks,
//! repeated boots, signals, and clear errors for bad input.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sbx_tests::{json_tail, read_until, require_real_kvm, sbx, sbx_bin, text};

#[test]
fn boots_with_1_2_and_4_vcpus_and_the_guest_sees_them() {
    require_real_kvm();
    for n in [1u32, 2, 4] {
        let vcpus = n.to_string();
        let out = sbx(&[
            "boot",
            "--vcpus",
            &vcpus,
            "--json",
            "--",
            "sh",
            "-c",
            "echo cpus=$(grep -c ^processor /proc/cpuinfo)",
        ]);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{n} vCPUs: stdout:\n{stdout}\nstderr:\n{}",
            text(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("cpus={n}")),
            "{n} vCPUs: guest said:\n{stdout}"
        );
        let doc = json_tail(&out);
        assert_eq!(doc["guest_status"], 0);
        assert!(
            doc["marks"]["guest_agent_start"]["wall_us"]
                .as_u64()
                .is_some(),
            "{doc}"
        );
    }
}

/// The guest is told of the TSC-deadline timer KVM emulates, so its kernel
/// uses it instead of calibrating the local APIC timer at boot.
#[test]
fn the_guest_sees_the_tsc_deadline_timer() {
    require_real_kvm();
    let out = sbx(&[
        "boot",
        "--",
        "grep",
        "-c",
        "tsc_deadline_timer",
        "/proc/cpuinfo",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

/// Every guest's kernel fills its pool from the host through virtio-rng,
/// and two guests draw different bytes.
#[test]
fn each_guest_draws_its_own_randomness_from_the_host() {
    require_real_kvm();
    let draw = || {
        let out = sbx(&[
            "boot",
            "--",
            "sh",
            "-c",
            "cat /sys/class/misc/hw_random/rng_current; head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'",
        ]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let (a, b) = (draw(), draw());
    let (source, bytes_a) = a.split_once('\n').unwrap();
    assert!(source.starts_with("virtio_rng"), "{a}");
    let bytes_b = b.split_once('\n').unwrap().1;
    assert_eq!(bytes_a.len(), 64, "{a}");
    assert_ne!(bytes_a, bytes_b, "two guests drew the same bytes");
}

#[test]
fn guest_exit_status_and_output_come_back() {
    require_real_kvm();
    let out = sbx(&[
        "boot",
        "--",
        "sh",
        "-c",
        "echo hello from $(hostname); exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("hello from sbx"));
    let missing = sbx(&["boot", "--", "no-such-command"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(text(&missing.stdout).contains("cannot run no-such-command"));
}

#[test]
fn guest_runs_the_built_6_1_kernel() {
    require_real_kvm();
    let out = sbx(&["boot", "--", "uname", "-r"]);
    assert_eq!(out.status.code(), Some(0));
    let host_release = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    let guest = text(&out.stdout);
    assert!(guest.contains("6.1."), "{guest}");
    assert!(
        !guest.contains(host_release.trim()),
        "guest reported the host's kernel"
    );
}

#[test]
fn twenty_consecutive_boots_all_succeed() {
    require_real_kvm();
    for i in 0..20 {
        let out = sbx(&["boot", "--console-log", "/dev/null", "--", "true"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "boot {i}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn timings_report_every_mark_in_order() {
    require_real_kvm();
    let out = sbx(&[
        "boot",
        "--timings",
        "--json",
        "--console-log",
        "/dev/null",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let table = text(&out.stderr);
    let order = [
        "vmm_start",
        "memory_ready",
        "devices_ready",
        "kernel_loaded",
        "vm_configured",
        "first_vcpu_entry",
        "guest_agent_start",
    ];
    for mark in order {
        assert!(table.contains(mark), "{table}");
    }
    let doc = json_tail(&out);
    let wall = |m: &str| doc["marks"][m]["wall_us"].as_u64().unwrap();
    for pair in order.windows(2) {
        assert!(wall(pair[0]) <= wall(pair[1]), "{pair:?}: {doc}");
    }
    assert!(wall("first_vcpu_entry") < wall("guest_agent_start"));
    assert!(doc["peak_rss_kib"].as_u64().unwrap() > 0);
}

#[test]
fn sigterm_stops_the_vm_promptly() {
    require_real_kvm();
    let mut child = Command::new(sbx_bin())
        .args(["boot", "--", "sh", "-c", "echo up; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the guest to be running the command.
    let mut stdout = child.stdout.take().unwrap();
    read_until(&mut stdout, "up", Duration::from_secs(60));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("signal 15"),
        "{}",
        text(&out.stderr)
    );
}

/// One line on stderr starting with "sbx: ", status 125, never a panic.
fn assert_clear_error(out: &std::process::Output, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "expected one line: {err}");
    assert!(
        err.starts_with("sbx: ") && err.contains(needle),
        "expected {needle:?} in: {err}"
    );
}

#[test]
fn bad_input_gets_one_clear_line() {
    require_real_kvm();
    let dir = std::env::temp_dir().join(format!("sbx-badinput-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let junk = junk.to_str().unwrap();

    assert_clear_error(
        &sbx(&["boot", "--kernel", "/nonexistent/vmlinux", "--", "true"]),
        "not found",
    );
    assert_clear_error(
        &sbx(&["boot", "--kernel", junk, "--", "true"]),
        "not an ELF vmlinux",
    );
    assert_clear_error(&sbx(&["boot", "--mem", "20", "--", "true"]), "too small");
    assert_clear_error(&sbx(&["boot", "--mem", "0", "--", "true"]), "--mem");
    assert_clear_error(&sbx(&["boot", "--vcpus", "0", "--", "true"]), "--vcpus 0");
    assert_clear_error(
        &sbx(&["boot", "--vcpus", "100000", "--", "true"]),
        "--vcpus 100000",
    );
    assert_clear_error(
        &sbx(&["boot", "--kvm", "/nonexistent/kvm", "--", "true"]),
        "does not exist",
    );

    // An unreadable /dev/kvm: as root, run as a user who may not open it;
    // as an ordinary user (who may), point at a device they may not open.
    // SAFETY: geteuid has no preconditions.
    let out = if unsafe { libc::geteuid() } == 0 {
        Command::new(sbx_bin())
            .args(["boot", "--", "true"])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run sbx as nobody")
    } else {
        // Root's alone on Linux (0640, root:kmem).
        let device = ["/dev/mem", "/dev/port"]
            .into_iter()
            .find(|d| std::path::Path::new(d).exists())
            .expect("this host has /dev/mem or /dev/port");
        sbx(&["boot", "--kvm", device, "--", "true"])
    };
    assert_clear_error(&out, "permission denied");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn triple_fault_is_reported_with_registers() {
    require_real_kvm();
    // A minimal ELF kernel whose first instruction is ud2: with no IDT the
    // exception escalates to a triple fault.
    let entry: u64 = 0x100_0000;
    let code = [0x0f, 0x0b];
    let mut elf = vec![0u8; 64 + 56];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16] = 2; // ET_EXEC
    elf[18] = 62; // x86_64
    elf[20] = 1;
    elf[24..32].copy_from_slice(&entry.to_le_bytes());
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf[52] = 64; // e_ehsize
    elf[54] = 56; // e_phentsize
    elf[56] = 1; // e_phnum
    let ph = 64;
    elf[ph] = 1; // PT_LOAD
    elf[ph + 4] = 5; // R+X
    let off = (64 + 56) as u64;
    elf[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
    elf[ph + 16..ph + 24].copy_from_slice(&entry.to_le_bytes());
    elf[ph + 24..ph + 32].copy_from_slice(&entry.to_le_bytes());
    elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(&code);
    let path = std::env::temp_dir().join(format!("sbx-ud2-{}.elf", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&elf)
        .unwrap();

    let out = sbx(&["boot", "--kernel", path.to_str().unwrap(), "--", "true"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("triple-faulted") && err.contains("rip="),
        "{err}"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn guest_reboot_through_i8042_ends_the_vm() {
    require_real_kvm();
    // busybox `reboot -f` skips the agent's exit report: the kernel resets
    // through the i8042 (reboot=k) and the VMM must end the VM.
    let start = Instant::now();
    let out = sbx(&["boot", "--", "reboot", "-f"]);
    let err = text(&out.stderr);
    assert!(start.elapsed() < Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("guest rebooted before the guest agent reported"),
        "{err}"
    );
}

#[test]
fn console_input_reaches_the_guest_shell() {
    require_real_kvm();
    let mut child = Command::new(sbx_bin())
        .arg("boot")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Type after the prompt, as a person would: the guest's 8250 driver
    // drops what arrives while the shell is still opening its terminal.
    let mut stdout = child.stdout.take().unwrap();
    read_until(&mut stdout, "# ", Duration::from_secs(60));
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"echo typed-$((6*7)); exit 5\n")
        .unwrap();
    let mut rest = Vec::new();
    {
        use std::io::Read;
        stdout.read_to_end(&mut rest).unwrap();
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(5), "{}", text(&rest));
    assert!(text(&rest).contains("typed-42"), "{}", text(&rest));
}
