//! One virtio-blk request, read from a descriptor chain the guest wrote and
//! checked before the disk is touched: the header must be readable, the
//! status byte writable, each data buffer in the direction its request
//! needs, the segments no more than the device offered, and every byte
//! inside the disk.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemory;

pub const SECTOR: u64 = 512;
/// The header: `le32 type; le32 reserved; le64 sector`.
const HEADER_LEN: u32 = 16;
/// A discard segment: `le64 sector; le32 num_sectors; le32 flags`.
pub const DISCARD_SEGMENT_LEN: u32 = 16;
/// Data buffers one request may carry (the device's `seg_max`).
pub const SEG_MAX: u32 = 128;
/// Discard segments one request may carry (`max_discard_seg`).
pub const DISCARD_SEG_MAX: u32 = 32;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    /// A type this device does not implement: answered UNSUPP.
    Other(u32),
}

impl Kind {
    fn from_type(t: u32) -> Kind {
        match t {
            VIRTIO_BLK_T_IN => Kind::Read,
            VIRTIO_BLK_T_OUT => Kind::Write,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            t => Kind::Other(t),
        }
    }

    /// Whether the device writes the data buffers (rather than reads them).
    fn device_writes(self) -> bool {
        matches!(self, Kind::Read | Kind::GetId)
    }
}

#[derive(Debug)]
pub struct Request {
    pub kind: Kind,
    pub sector: u64,
    /// Data buffers in order (guest address, length).
    pub data: Vec<(GuestAddress, u32)>,
}

impl Request {
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, l)| u64::from(*l)).sum()
    }
}

/// Why a chain was not even a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Unanswerable {
    /// No writable last descriptor to put a status in.
    NoStatus,
}

/// Why a well-framed request fails (answered IOERR).
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    Header,
    Direction,
    TooManySegments,
    Unaligned,
    OutOfRange,
    ReadOnly,
}

/// A chain with somewhere to put a status byte, and the request in it.
#[derive(Debug)]
pub struct Parsed {
    pub status: GuestAddress,
    pub request: Result<Request, Invalid>,
}

/// Reads the request in `descs` (the whole chain, in order). An error
/// means no status can be given; an invalid request is answered IOERR.
pub fn parse(mem: &GuestMemory, descs: &[Descriptor]) -> Result<Parsed, Unanswerable> {
    let Some((last, rest)) = descs.split_last() else {
        return Err(Unanswerable::NoStatus);
    };
    if !last.is_write_only() || last.len() == 0 {
        return Err(Unanswerable::NoStatus);
    }
    // A one-byte status at the end of the last buffer (the spec puts it
    // last; a driver may fold it into a larger buffer).
    let status = GuestAddress(last.addr().0.wrapping_add(u64::from(last.len()) - 1));
    Ok(Parsed {
        status,
        request: parse_body(mem, rest),
    })
}

fn parse_body(mem: &GuestMemory, descs: &[Descriptor]) -> Result<Request, Invalid> {
    let (head, data) = descs.split_first().ok_or(Invalid::Header)?;
    if head.is_write_only() || head.len() < HEADER_LEN {
        return Err(Invalid::Header);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut header, head.addr())
        .map_err(|_| Invalid::Header)?;
    let kind = Kind::from_type(u32::from_le_bytes(
        header[0..4].try_into().unwrap_or([0; 4]),
    ));
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    if data.len() > SEG_MAX as usize {
        return Err(Invalid::TooManySegments);
    }
    let writes = kind.device_writes();
    if data.iter().any(|d| d.is_write_only() != writes) {
        return Err(Invalid::Direction);
    }
    let request = Request {
        kind,
        sector,
        data: data.iter().map(|d| (d.addr(), d.len())).collect(),
    };
    match kind {
        Kind::Read | Kind::Write if !request.data_len().is_multiple_of(SECTOR) => {
            Err(Invalid::Unaligned)
        }
        Kind::Discard
            if !request
                .data_len()
                .is_multiple_of(u64::from(DISCARD_SEGMENT_LEN))
                || request.data_len()
                    > u64::from(DISCARD_SEG_MAX) * u64::from(DISCARD_SEGMENT_LEN) =>
        {
            Err(Invalid::TooManySegments)
        }
        _ => Ok(request),
    }
}

/// The byte range `sectors` sectors from `sector` covers, if it lies
/// inside a disk of `capacity` sectors.
pub fn byte_range(sector: u64, sectors: u64, capacity: u64) -> Result<(u64, u64), Invalid> {
    let end = sector.checked_add(sectors).ok_or(Invalid::OutOfRange)?;
    if end > capacity {
        return Err(Invalid::OutOfRange);
    }
    Ok((sector * SECTOR, sectors * SECTOR))
}

/// The discard segments of a request: (sector, sectors) each.
pub fn discard_segments(mem: &GuestMemory, request: &Request) -> Result<Vec<(u64, u64)>, Invalid> {
    let mut out = Vec::new();
    let mut bytes = Vec::new();
    for &(addr, len) in &request.data {
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, addr)
            .map_err(|_| Invalid::Header)?;
        bytes.extend(buf);
    }
    for seg in bytes.chunks_exact(DISCARD_SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
        // Only "unmap" (bit 0) is defined for discard; anything else is a
        // request this device does not understand.
        if flags & !1 != 0 {
            return Err(Invalid::Header);
        }
        out.push((sector, u64::from(sectors)));
    }
    Ok(out)
}
