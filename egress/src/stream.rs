//! The two kinds of socket the proxy joins: the guest's side arrives as a
//! Unix stream from the vsock device (or TCP when driven from the host, as
//! in tests and benchmarks), the upstream side is TCP. Keeping them
//! concrete lets `std::io::copy` splice between them in the kernel.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

/// Copies `from` to `to` until end of stream, in the kernel where it can.
fn copy_one(from: &Stream, to: &Stream) -> io::Result<u64> {
    match (from, to) {
        (Stream::Tcp(a), Stream::Tcp(b)) => io::copy(&mut &*a, &mut &*b),
        (Stream::Tcp(a), Stream::Unix(b)) => io::copy(&mut &*a, &mut &*b),
        (Stream::Unix(a), Stream::Tcp(b)) => io::copy(&mut &*a, &mut &*b),
        (Stream::Unix(a), Stream::Unix(b)) => io::copy(&mut &*a, &mut &*b),
    }
}

/// Joins two streams until both directions have ended; returns the bytes
/// moved each way (a to b, b to a). One direction runs on a helper thread.
pub fn join(a: Stream, b: Stream) -> io::Result<(u64, u64)> {
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let back = std::thread::Builder::new()
        .name("egress-pipe".into())
        .spawn(move || {
            let n = copy_one(&b2, &a2).unwrap_or(0);
            a2.shutdown(Shutdown::Write);
            n
        })?;
    let up = copy_one(&a, &b).unwrap_or(0);
    b.shutdown(Shutdown::Write);
    let down = back.join().unwrap_or(0);
    Ok((up, down))
}

/// A reader that first yields bytes already read from `inner`.
pub struct Prefixed<S> {
    pub prefix: Vec<u8>,
    pos: usize,
    pub inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: Read> Read for Prefixed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.prefix.len() {
            let n = buf.len().min(self.prefix.len() - self.pos);
            buf[..n].copy_from_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Prefixed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
