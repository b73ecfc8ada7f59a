//! Terminal modes (raw for an interactive console, no echo for a secret),
//! restored on drop (also on error paths).

pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts `fd` in raw mode if it is a terminal; None otherwise. Output
    /// post-processing stays on (the serial console sends bare "\n").
    pub fn enter(fd: i32) -> Option<RawMode> {
        Self::enter_with(fd, |t| {
            // SAFETY: edits a local termios.
            unsafe { libc::cfmakeraw(t) };
            t.c_oflag |= libc::OPOST;
        })
    }

    /// Raw mode with output untouched too, for a guest PTY that does its
    /// own "\r\n".
    pub fn enter_fully(fd: i32) -> Option<RawMode> {
        // SAFETY: edits a local termios.
        Self::enter_with(fd, |t| unsafe { libc::cfmakeraw(t) })
    }

    /// Line mode without echo, for typing a secret.
    pub fn echo_off(fd: i32) -> Option<RawMode> {
        Self::enter_with(fd, |t| t.c_lflag &= !libc::ECHO)
    }

    fn enter_with(fd: i32, change: impl FnOnce(&mut libc::termios)) -> Option<RawMode> {
        // SAFETY: isatty/tcgetattr/tcsetattr on a caller-provided fd with local buffers.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            change(&mut raw);
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
