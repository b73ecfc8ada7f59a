//! The guest agent protocol, spoken over one vsock stream per session
//! (version 1). Either side may be hostile to the other's parsing, so the
//! decoder bounds every allocation and never panics.
//!
//! A frame is `[length: u32 LE][kind: u8][body]`, where `length` counts
//! `kind` and `body` and is at most [`MAX_FRAME`]. Output and input bytes
//! travel in binary data frames (`[id: u32 LE][bytes]`); everything else is a
//! JSON [`Control`] message, so fields can be added without a new version.
//!
//! Flow control: each side may have at most [`INITIAL_CREDIT`] bytes of one
//! process's stream in flight; the receiver returns credit with
//! [`Control::Credit`] as it consumes data, so a reader that stops reading
//! stalls only its own process, never the connection.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub const VERSION: u16 = 1;
/// The guest agent listens here; each connection carries one request.
pub const AGENT_PORT: u32 = 1024;
/// The host listens here for the guest agent's events.
pub const EVENTS_PORT: u32 = 1025;
/// Largest `length` a frame may declare.
pub const MAX_FRAME: u32 = 1 << 20;
/// Bytes of one stream a sender may have unacknowledged.
pub const INITIAL_CREDIT: u32 = 256 * 1024;
/// Largest data payload per frame, leaving room for the header.
pub const MAX_DATA: usize = 64 * 1024;

const KIND_CONTROL: u8 = 1;
const KIND_STDIN: u8 = 0x10;
const KIND_STDOUT: u8 = 0x11;
const KIND_STDERR: u8 = 0x12;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// Run a process in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Chosen by the host, unique on the connection.
    pub id: u32,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// A user name or numeric uid; root when absent.
    pub user: Option<String>,
    /// Run on a new PTY of this size instead of pipes.
    pub pty: Option<WinSize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    AgentReady,
    ProcessStarted,
    ProcessExited,
    KernelPanic,
    KernelOops,
}

/// Something the guest reports for the session's event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestEvent {
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// First message each way; the peer closes on a version it cannot speak.
    Hello {
        version: u16,
        agent: String,
    },
    Exec(ExecRequest),
    Started {
        id: u32,
        pid: u32,
    },
    /// The process ended: `code` if it exited, `signal` if a signal killed it.
    Exited {
        id: u32,
        code: Option<i32>,
        signal: Option<i32>,
    },
    CloseStdin {
        id: u32,
    },
    Resize {
        id: u32,
        size: WinSize,
    },
    Kill {
        id: u32,
        signal: i32,
    },
    Credit {
        id: u32,
        stream: Stream,
        bytes: u32,
    },
    Event(GuestEvent),
    /// A request could not be carried out (`id` names it when there is one).
    Error {
        id: Option<u32>,
        message: String,
    },
    /// Stop every process, sync and power off (a graceful `sbx stop`).
    Shutdown,
    /// Host only (`sbx pause`, on the session's control socket): stop the
    /// VM's vCPUs, keeping its memory. Answered with `Paused`, or `Error`.
    Pause,
    /// Host only (`sbx resume`): let a paused VM run again. Answered with
    /// `Resumed`, or `Error`.
    Resume,
    Paused,
    Resumed,
    /// The host changed these paths of shared directories: revalidate
    /// what the guest kernel cached of them. `trees` are share roots in
    /// which anything may have changed. Answered by closing.
    Refresh {
        #[serde(default)]
        paths: Vec<String>,
        #[serde(default)]
        trees: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Control(Control),
    Data {
        id: u32,
        stream: Stream,
        bytes: Vec<u8>,
    },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0:#x}")]
    UnknownKind(u8),
    #[error("data frame shorter than its process id")]
    ShortData,
    #[error("bad control message: {0}")]
    BadControl(String),
}

fn data_kind(stream: Stream) -> u8 {
    match stream {
        Stream::Stdin => KIND_STDIN,
        Stream::Stdout => KIND_STDOUT,
        Stream::Stderr => KIND_STDERR,
    }
}

fn header(out: &mut Vec<u8>, body_len: usize, kind: u8) {
    let len = u32::try_from(body_len + 1).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
}

/// Appends one encoded frame to `out`. Data larger than [`MAX_DATA`] is
/// split over several frames.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    match frame {
        Frame::Control(c) => {
            let body = serde_json::to_vec(c).expect("control messages serialise");
            header(out, body.len(), KIND_CONTROL);
            out.extend_from_slice(&body);
        }
        Frame::Data { id, stream, bytes } => {
            let chunks: Vec<&[u8]> = if bytes.is_empty() {
                vec![&[][..]]
            } else {
                bytes.chunks(MAX_DATA).collect()
            };
            for chunk in chunks {
                header(out, 4 + chunk.len(), data_kind(*stream));
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(chunk);
            }
        }
    }
}

/// Reassembles frames from a byte stream fed in pieces of any size.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes waiting for the rest of their frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes the bytes read past the last whole frame.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// The next whole frame, if one has arrived. An error means the peer is
    /// broken or hostile: close the connection.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let Some(len_bytes) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes"));
        if len > MAX_FRAME {
            return Err(DecodeError::TooLarge(len));
        }
        if len == 0 {
            return Err(DecodeError::Empty);
        }
        let total = 4 + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let kind = self.buf[4];
        let body = &self.buf[5..total];
        let frame = match kind {
            KIND_CONTROL => serde_json::from_slice(body)
                .map(Frame::Control)
                .map_err(|e| DecodeError::BadControl(e.to_string())),
            KIND_STDIN | KIND_STDOUT | KIND_STDERR => {
                let stream = match kind {
                    KIND_STDIN => Stream::Stdin,
                    KIND_STDOUT => Stream::Stdout,
                    _ => Stream::Stderr,
                };
                match body.get(..4) {
                    Some(id) => Ok(Frame::Data {
                        id: u32::from_le_bytes(id.try_into().expect("4 bytes")),
                        stream,
                        bytes: body[4..].to_vec(),
                    }),
                    None => Err(DecodeError::ShortData),
                }
            }
            other => Err(DecodeError::UnknownKind(other)),
        };
        self.buf.drain(..total);
        frame.map(Some)
    }
}

/// Frames from a blocking reader.
pub struct FrameIo<R> {
    inner: R,
    reader: FrameReader,
    buf: Box<[u8]>,
}

impl<R: Read> FrameIo<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            reader: FrameReader::default(),
            buf: vec![0u8; MAX_DATA + 16].into_boxed_slice(),
        }
    }

    /// The next frame; None at a clean end of stream. A broken frame or an
    /// end of stream inside a frame is an error.
    pub fn read_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
            let n = match self.inner.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return match self.reader.buffered() {
                    0 => Ok(None),
                    _ => Err(std::io::ErrorKind::UnexpectedEof.into()),
                };
            }
            self.reader.push(&self.buf[..n]);
        }
    }

    /// The reader back, with any bytes read past the last frame returned.
    pub fn into_parts(mut self) -> (R, Vec<u8>) {
        let rest = self.reader.take_buffered();
        (self.inner, rest)
    }
}

/// Encodes and writes one frame in a single `write_all`.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> std::io::Result<()> {
    let mut out = Vec::new();
    encode(frame, &mut out);
    w.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        let ws = WinSize { rows: 24, cols: 80 };
        vec![
            Frame::Control(Control::Hello {
                version: VERSION,
                agent: "sbx-agent 0.1".into(),
            }),
            Frame::Control(Control::Exec(ExecRequest {
                id: 7,
                argv: vec!["sh".into(), "-c".into(), "echo \"hi\"".into()],
                env: vec![("A".into(), "b=c".into())],
                cwd: Some("/workspace".into()),
                user: Some("1000".into()),
                pty: Some(ws),
            })),
            Frame::Control(Control::Started { id: 7, pid: 42 }),
            Frame::Control(Control::Exited {
                id: 7,
                code: None,
                signal: Some(9),
            }),
            Frame::Control(Control::CloseStdin { id: 7 }),
            Frame::Control(Control::Resize { id: 7, size: ws }),
            Frame::Control(Control::Kill { id: 7, signal: 2 }),
            Frame::Control(Control::Credit {
                id: 7,
                stream: Stream::Stdout,
                bytes: 4096,
            }),
            Frame::Control(Control::Event(GuestEvent {
                kind: EventKind::KernelOops,
                id: None,
                argv: vec![],
                code: None,
                detail: Some("BUG: unable to handle page fault".into()),
            })),
            Frame::Control(Control::Error {
                id: Some(7),
                message: "sh: not found".into(),
            }),
            Frame::Control(Control::Shutdown),
            Frame::Control(Control::Pause),
            Frame::Control(Control::Resumed),
            Frame::Control(Control::Refresh {
                paths: vec!["/workspace/src/a.rs".into()],
                trees: vec!["/data".into()],
            }),
            Frame::Data {
                id: 7,
                stream: Stream::Stdin,
                bytes: vec![],
            },
            Frame::Data {
                id: 7,
                stream: Stream::Stdout,
                bytes: b"out\n".to_vec(),
            },
            Frame::Data {
                id: u32::MAX,
                stream: Stream::Stderr,
                bytes: vec![0, 255, 10],
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_byte_by_byte() {
        let mut wire = Vec::new();
        for f in all_frames() {
            encode(&f, &mut wire);
        }
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for b in wire {
            r.push(&[b]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all_frames());
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn frame_io_reads_frames_and_returns_the_rest() {
        let mut wire = Vec::new();
        for f in all_frames() {
            encode(&f, &mut wire);
        }
        wire.extend_from_slice(b"tail");
        let mut io = FrameIo::new(&wire[..]);
        for want in all_frames() {
            assert_eq!(io.read_frame().unwrap(), Some(want));
        }
        let (_, rest) = io.into_parts();
        assert_eq!(rest, b"tail");
        let cut = &wire[..7];
        let mut io = FrameIo::new(cut);
        assert_eq!(
            io.read_frame().unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        assert_eq!(FrameIo::new(&[][..]).read_frame().unwrap(), None);
    }

    #[test]
    fn large_data_is_split_and_reassembles() {
        let bytes: Vec<u8> = (0..(MAX_DATA * 2 + 10)).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        encode(
            &Frame::Data {
                id: 1,
                stream: Stream::Stdout,
                bytes: bytes.clone(),
            },
            &mut wire,
        );
        let mut r = FrameReader::default();
        r.push(&wire);
        let mut joined = Vec::new();
        let mut frames = 0;
        while let Some(Frame::Data { bytes, .. }) = r.next_frame().unwrap() {
            joined.extend(bytes);
            frames += 1;
        }
        assert_eq!((frames, joined), (3, bytes));
    }

    #[test]
    fn hostile_input_is_an_error_not_an_allocation_or_panic() {
        let mut r = FrameReader::default();
        r.push(&u32::MAX.to_le_bytes());
        assert_eq!(r.next_frame(), Err(DecodeError::TooLarge(u32::MAX)));
        let cases: [(&[u8], DecodeError); 4] = [
            (&[0, 0, 0, 0], DecodeError::Empty),
            (&[1, 0, 0, 0, 0x7f], DecodeError::UnknownKind(0x7f)),
            (&[3, 0, 0, 0, KIND_STDOUT, 1, 2], DecodeError::ShortData),
            (
                &[3, 0, 0, 0, KIND_CONTROL, b'{', b'}'],
                DecodeError::BadControl(String::new()),
            ),
        ];
        for (bytes, want) in cases {
            let mut r = FrameReader::default();
            r.push(bytes);
            let got = r.next_frame().unwrap_err();
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{bytes:?}: {got}"
            );
        }
        // Random bytes: errors or frames, never a panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut r = FrameReader::default();
            let n = (x % 64) as usize;
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Small lengths, so that whole frames do occur.
                    (x % 7) as u8
                })
                .collect();
            r.push(&bytes);
            while let Ok(Some(_)) = r.next_frame() {}
        }
    }
}
