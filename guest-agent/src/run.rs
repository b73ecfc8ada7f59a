//! Runs the guest's command and reaps every child until it ends.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Exit status in the shell's convention: the code, or 128 + signal.
fn status_code(status: libc::c_int) -> u8 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else if libc::WIFSIGNALED(status) {
        (128 + libc::WTERMSIG(status)) as u8
    } else {
        1
    }
}

/// Runs `argv` (an interactive shell on the serial console when empty) and
/// returns its exit status. 127 means the command could not be started.
pub fn run(argv: &[String]) -> u8 {
    let interactive = argv.is_empty();
    let (program, args) = match argv.split_first() {
        Some((p, rest)) => (p.as_str(), rest),
        None => ("/bin/sh", &[][..]),
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", crate::exec::PATH)
        .env("HOME", "/root")
        .env(
            "TERM",
            std::env::var("TERM").unwrap_or_else(|_| "linux".into()),
        )
        .current_dir("/");
    if interactive {
        // A session of its own with the serial port as controlling terminal,
        // so that job control and Ctrl-C work in the shell.
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                let fd = libc::open(c"/dev/ttyS0".as_ptr(), libc::O_RDWR);
                if fd >= 0 {
                    libc::ioctl(fd, libc::TIOCSCTTY, 1);
                    for target in 0..3 {
                        libc::dup2(fd, target);
                    }
                    if fd > 2 {
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sbx-guest-agent: cannot run {program}: {e}");
            return 127;
        }
    };
    wait_reaping(child.id() as libc::pid_t)
}

/// Waits for `pid` while reaping any other exited process (PID 1 inherits orphans).
fn wait_reaping(pid: libc::pid_t) -> u8 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == pid {
            return status_code(status);
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(run(&["sh".into(), "-c".into(), "exit 7".into()]), 7);
        assert_eq!(run(&["sh".into(), "-c".into(), "kill -9 $$".into()]), 137);
        assert_eq!(run(&["/nonexistent/program".into()]), 127);
    }
}
