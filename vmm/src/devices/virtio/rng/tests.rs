//! The entropy device driven as a hostile driver would: buffers of every
//! size and direction, and two VMs that must not get the same bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{Rng, MAX_PER_REQUEST};
use crate::devices::virtio::test_ring::{Ring, WRITE};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::vstate::memory::{self, GuestMemory};

struct Guest {
    mem: GuestMemory,
    ring: Ring,
    kick: EventFd,
    _dev: Rng,
}

impl Guest {
    fn new() -> Guest {
        let mem = memory::create(16).unwrap();
        let ring = Ring::at(0x10_000);
        let kick = EventFd::new(0).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut dev = Rng::new();
        dev.activate(
            mem.clone(),
            vec![ring.queue()],
            vec![kick.try_clone().unwrap()],
            irq,
        )
        .unwrap();
        Guest {
            mem,
            ring,
            kick,
            _dev: dev,
        }
    }

    /// Posts `descs`, kicks and returns the used length.
    fn request(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        self.ring.post(&self.mem, descs);
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((_, len)) = self.ring.take_used(&self.mem).pop() {
                return len;
            }
            assert!(Instant::now() < deadline, "the device did not answer");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
}

#[test]
fn requests_are_filled_within_their_buffers_and_the_bound() {
    let mut g = Guest::new();
    // A plain request: every byte written, the one after untouched.
    assert_eq!(g.request(&[(0x100_000, 64, WRITE)]), 64);
    let got = g.read(0x100_000, 65);
    assert!(got[..64].iter().any(|b| *b != 0));
    assert_eq!(got[64], 0);
    // Driver-readable buffers are not written; writable ones around them are.
    assert_eq!(g.request(&[(0x200_000, 32, 0), (0x201_000, 16, WRITE)]), 16);
    assert_eq!(g.read(0x200_000, 32), vec![0; 32]);
    // A request for more than the bound gets the bound.
    assert_eq!(
        g.request(&[(0x300_000, 0x20_000, WRITE), (0x400_000, 0x1000, WRITE)]),
        MAX_PER_REQUEST as u32
    );
    assert_eq!(g.read(0x400_000, 16), vec![0; 16]);
    // Buffers outside guest memory end the request, not the device.
    assert_eq!(g.request(&[(1 << 40, 64, WRITE)]), 0);
    assert_eq!(g.request(&[(0x500_000, 8, WRITE)]), 8);
}

#[test]
fn two_vms_never_get_the_same_bytes() {
    let (mut a, mut b) = (Guest::new(), Guest::new());
    a.request(&[(0x100_000, 64, WRITE)]);
    b.request(&[(0x100_000, 64, WRITE)]);
    assert_ne!(a.read(0x100_000, 64), b.read(0x100_000, 64));
}
