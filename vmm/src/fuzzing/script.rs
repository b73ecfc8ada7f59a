//! A driver's script read out of the fuzzer's bytes, and written for seeds.
//! Reads past the end give zeros and end the script, so every input is a
//! valid script and a short one simply does less.

pub struct Script<'a> {
    data: &'a [u8],
    ended: bool,
}

impl<'a> Script<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, ended: false }
    }

    /// Whether a read has run past the end.
    pub fn ended(&self) -> bool {
        self.ended || self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        if n > self.data.len() {
            self.ended = true;
        }
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.bytes(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length-prefixed run of bytes (at most 255, or `u16` with `long`).
    pub fn blob(&mut self, long: bool) -> &'a [u8] {
        let n = if long {
            usize::from(self.u16())
        } else {
            usize::from(self.u8())
        };
        self.bytes(n)
    }

    /// A guest address: mostly inside `mem_len` bytes of memory, sometimes
    /// anywhere (the top bit says which), as a hostile driver may write.
    pub fn addr(&mut self, mem_len: u64) -> u64 {
        let a = self.u32();
        if a & 0x8000_0000 == 0 {
            u64::from(a) % mem_len
        } else {
            u64::from(a & 0x7fff_ffff) << 4
        }
    }
}

/// Writes scripts for seed inputs, mirroring [`Script`]'s reads.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    pub fn blob(&mut self, long: bool, b: &[u8]) -> &mut Self {
        if long {
            self.u16(b.len() as u16);
        } else {
            self.u8(b.len() as u8);
        }
        self.0.extend(b);
        self
    }
    /// An address inside guest memory, as [`Script::addr`] reads it.
    pub fn addr(&mut self, a: u64) -> &mut Self {
        self.u32(a as u32 & 0x7fff_ffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mirror_writes_and_running_out_ends_the_script() {
        let mut w = Writer::default();
        w.u8(7)
            .u16(300)
            .u32(70_000)
            .u64(1 << 40)
            .blob(false, b"abc")
            .addr(0x1234);
        let mut s = Script::new(&w.0);
        assert_eq!(
            (s.u8(), s.u16(), s.u32(), s.u64()),
            (7, 300, 70_000, 1 << 40)
        );
        assert_eq!(s.blob(false), b"abc");
        assert_eq!(s.addr(1 << 20), 0x1234);
        assert!(s.ended());
        assert_eq!(s.u32(), 0);
        let mut short = Script::new(&[1, 2]);
        assert_eq!(short.u32(), 0x0201);
        assert!(short.ended());
    }
}
