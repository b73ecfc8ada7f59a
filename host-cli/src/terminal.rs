//! Raw mode for an interactive console, restored on drop (also on error paths).

pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts `fd` in raw mode if it is a terminal; None otherwise. Output
    /// post-processing stays on (the serial console sends bare "\n").
    pub fn enter(fd: i32) -> Option<RawMode> {
        Self::enter_with(fd, true)
    }

    /// Raw mode with output untouched too, for a guest PTY that does its
    /// own "\r\n".
    pub fn enter_fully(fd: i32) -> Option<RawMode> {
        Self::enter_with(fd, false)
    }

    fn enter_with(fd: i32, opost: bool) -> Option<RawMode> {
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
            libc::cfmakeraw(&mut raw);
            if opost {
                raw.c_oflag |= libc::OPOST;
            }
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
