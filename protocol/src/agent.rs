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

use std::io::{IoSlice, Read, Write};

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

/// `bytes` as the payloads of data frames of at most `size` bytes each; no
/// bytes are one empty frame (which the peer still hears of).
fn pieces(bytes: &[u8], size: usize) -> Vec<&[u8]> {
    if bytes.is_empty() {
        vec![&[][..]]
    } else {
        bytes.chunks(size).collect()
    }
}

/// A data frame's bytes before its payload: length, kind and id.
pub const DATA_HEAD: usize = 9;

fn data_head(id: u32, stream: Stream, payload: usize) -> [u8; DATA_HEAD] {
    let mut head = [0u8; DATA_HEAD];
    let len = u32::try_from(payload + 5).unwrap_or(u32::MAX);
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4] = data_kind(stream);
    head[5..].copy_from_slice(&id.to_le_bytes());
    head
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
            for chunk in pieces(bytes, MAX_DATA) {
                out.extend_from_slice(&data_head(*id, *stream, chunk.len()));
                out.extend_from_slice(chunk);
            }
        }
    }
}

/// Reassembles frames from a byte stream fed in pieces of any size.
/// Bytes wait in `buf[start..end]`: taking a frame moves `start` instead of
/// the bytes after it, and a reader fills `buf` in place (see
/// [`FrameReader::read_from`]), so output crosses it with one copy, into
/// its frame.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Makes room for `more` bytes after the waiting ones.
    fn room(&mut self, more: usize) {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.buf.len() - self.end < more && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.buf.len() - self.end < more {
            self.buf.resize(self.end + more, 0);
        }
    }

    /// Reads once from `r`, at most `max` bytes, straight into the buffer;
    /// the count read, 0 at the end of the stream.
    pub fn read_from(&mut self, r: &mut impl Read, max: usize) -> std::io::Result<usize> {
        self.room(max);
        let n = r.read(&mut self.buf[self.end..self.end + max])?;
        self.end += n;
        Ok(n)
    }

    /// Bytes waiting for the rest of their frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Takes the bytes read past the last whole frame.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf[self.start..self.end].to_vec();
        *self = FrameReader::default();
        rest
    }

    /// The next whole frame, if one has arrived. An error means the peer is
    /// broken or hostile: close the connection.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let waiting = &self.buf[self.start..self.end];
        let Some(len_bytes) = waiting.get(..4) else {
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
        if waiting.len() < total {
            return Ok(None);
        }
        let kind = waiting[4];
        let body = &waiting[5..total];
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
        self.start += total;
        frame.map(Some)
    }
}

/// Frames from a blocking reader.
pub struct FrameIo<R> {
    inner: R,
    reader: FrameReader,
}

/// How much [`FrameIo`] reads at once: a whole data frame and more.
const READ_SIZE: usize = MAX_DATA + 16;

impl<R: Read> FrameIo<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            reader: FrameReader::default(),
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
            let n = match self.reader.read_from(&mut self.inner, READ_SIZE) {
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

/// Writes `bytes` of `stream` as data frames straight from where they are:
/// every frame's head and bytes in vectored writes, instead of copying
/// them into [`Frame`]s and an encoded buffer first (the guest's output
/// path, where every copy costs). Each frame holds at most
/// `MAX_DATA - DATA_HEAD` bytes, so that it is exactly one vsock packet of
/// the largest size the guest's kernel sends.
pub fn write_data(
    w: &mut impl Write,
    id: u32,
    stream: Stream,
    bytes: &[u8],
) -> std::io::Result<()> {
    let chunks = pieces(bytes, MAX_DATA - DATA_HEAD);
    let heads: Vec<[u8; DATA_HEAD]> = chunks
        .iter()
        .map(|c| data_head(id, stream, c.len()))
        .collect();
    let mut slices: Vec<IoSlice<'_>> = heads
        .iter()
        .zip(&chunks)
        .flat_map(|(h, c)| [IoSlice::new(h), IoSlice::new(c)])
        .collect();
    let mut left: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        match w.write_vectored(left) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

    /// A socket that takes a few bytes per call, or is interrupted.
    struct Trickle {
        got: Vec<u8>,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(5) {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(self.calls % 7 + 1);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn data_written_in_place_is_what_encode_makes_through_short_writes() {
        let most = MAX_DATA - DATA_HEAD;
        for len in [0, 10, most, most + 1, 3 * MAX_DATA + 5] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let chunks: Vec<&[u8]> = if len == 0 {
                vec![&[]]
            } else {
                bytes.chunks(most).collect()
            };
            let mut want = Vec::new();
            for chunk in chunks {
                encode(
                    &Frame::Data {
                        id: 9,
                        stream: Stream::Stderr,
                        bytes: chunk.to_vec(),
                    },
                    &mut want,
                );
                // A full frame is one 64 KiB vsock packet.
                assert!(want.len().is_multiple_of(MAX_DATA) || chunk.len() < most);
            }
            let mut w = Trickle {
                got: Vec::new(),
                calls: 0,
            };
            write_data(&mut w, 9, Stream::Stderr, &bytes).unwrap();
            assert!(w.got == want, "{len} bytes written differently");
        }
    }

    /// A stream that returns reads of odd sizes.
    struct Pieces<'a> {
        wire: &'a [u8],
        n: usize,
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.n += 1;
            let n = (self.n * 4099 % 70_001).min(buf.len()).min(self.wire.len());
            buf[..n].copy_from_slice(&self.wire[..n]);
            self.wire = &self.wire[n..];
            Ok(n)
        }
    }

    #[test]
    fn frames_read_in_place_survive_reads_of_any_size() {
        let mut want = all_frames();
        for len in [MAX_DATA, 3, MAX_DATA - 1, 0, 40_000] {
            want.push(Frame::Data {
                id: len as u32,
                stream: Stream::Stdout,
                bytes: (0..len).map(|i| (i % 251) as u8).collect(),
            });
        }
        let mut wire = Vec::new();
        for _ in 0..4 {
            for f in &want {
                encode(f, &mut wire);
            }
        }
        let mut io = FrameIo::new(Pieces { wire: &wire, n: 0 });
        for f in want.iter().cycle().take(want.len() * 4) {
            assert_eq!(io.read_frame().unwrap().as_ref(), Some(f));
        }
        assert_eq!(io.read_frame().unwrap(), None);
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
