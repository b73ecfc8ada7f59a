//! The virtio-mmio transport, version 2 (virtio 1.x "modern" registers).
//! The guest finds each device through `virtio_mmio.device=<size>@<base>:<irq>`
//! on its command line. Queue notifications arrive on ioeventfds and
//! interrupts leave through an irqfd, so in steady state the vCPU thread
//! only sees the interrupt acknowledgement.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{Interrupt, INT_CONFIG};
use super::{VirtioDevice, TRANSPORT_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemory;

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify, where the ioeventfds listen.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x0053_4258; // "SBX"

const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;
const STATUS_FAILED: u32 = 128;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    kicks: Vec<EventFd>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    active: bool,
}

impl MmioTransport {
    /// `kicks` holds one eventfd per queue, already registered as ioeventfds.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        kicks: Vec<EventFd>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        Self {
            device,
            mem,
            interrupt,
            kicks,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            active: false,
        }
    }

    pub fn shared(self) -> Arc<Mutex<MmioTransport>> {
        Arc::new(Mutex::new(self))
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change while the driver is setting up.
    fn queue_configurable(&self) -> bool {
        !self.active && self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Stops the device for good (VM teardown).
    pub fn shutdown(&mut self) {
        self.device.reset();
        self.active = false;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits, in order; anything else is ignored.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            // A legacy-only driver: refuse FEATURES_OK, which the driver reads back.
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let bad = self
            .queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(&self.mem));
        let result = match bad {
            Some(i) => Err(super::ActivateError::BadQueue(i)),
            None => {
                // The device gets copies; the transport keeps its own for
                // reporting (QueueReady) and for a later reset.
                let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
                let queues: Result<Vec<Queue>, _> = self
                    .queues
                    .iter()
                    .map(|q| {
                        let mut q = Queue::try_from(q.state())?;
                        q.set_event_idx(event_idx);
                        Ok::<_, virtio_queue::Error>(q)
                    })
                    .collect();
                let kicks: Result<Vec<_>, _> = self.kicks.iter().map(EventFd::try_clone).collect();
                match (queues, kicks) {
                    (Ok(queues), Ok(kicks)) => self.device.activate(
                        self.mem.clone(),
                        queues,
                        kicks,
                        self.interrupt.clone(),
                    ),
                    (Err(_), _) => Err(super::ActivateError::BadQueue(0)),
                    (_, Err(e)) => Err(super::ActivateError::Worker(e)),
                }
            }
        };
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::warn!(device = self.device.device_type(), error = %e, "virtio device not activated");
                self.status |= STATUS_NEEDS_RESET;
                self.interrupt.trigger(INT_CONFIG);
            }
        }
    }
}

fn read_u32(data: &mut [u8], value: u32) {
    if data.len() == 4 {
        data.copy_from_slice(&value.to_le_bytes());
    } else {
        data.fill(0);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let value = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let features = self.device.features() | TRANSPORT_FEATURES;
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            // ConfigGeneration: sbx's device configuration never changes.
            0xfc => 0,
            _ => 0,
        };
        read_u32(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // No device sbx offers has writable configuration.
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let configurable = self.queue_configurable();
        match offset {
            0x14 => self.device_features_sel = v,
            // Features may only be written between DRIVER and FEATURES_OK.
            0x20 if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0 => {
                let offered = self.device.features() | TRANSPORT_FEATURES;
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                // Bits the device never offered are dropped, not trusted.
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(v) << shift) & offered);
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if configurable => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 if configurable => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if configurable => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.queue() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            // QueueNotify normally goes to the ioeventfd; this is the fallback.
            0x50 => {
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            _ => {}
        }
    }
}

/// Where the guest finds a device: the kernel parameter for it.
pub fn cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    const STATUS_ACKNOWLEDGE: u32 = 1;

    struct Dummy(Arc<AtomicBool>);
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn activate(
            &mut self,
            _: GuestMemory,
            queues: Vec<Queue>,
            kicks: Vec<EventFd>,
            _: Arc<Interrupt>,
        ) -> Result<(), super::super::ActivateError> {
            assert_eq!((queues.len(), kicks.len()), (2, 2));
            self.0.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn transport() -> (MmioTransport, Arc<AtomicBool>) {
        let mem = crate::vstate::memory::create(16).unwrap();
        let on = Arc::new(AtomicBool::new(false));
        let irq = EventFd::new(0).unwrap();
        let kicks = vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let t = MmioTransport::new(
            Box::new(Dummy(on.clone())),
            mem,
            Arc::new(Interrupt::new(irq)),
            kicks,
        );
        (t, on)
    }

    #[test]
    fn driver_handshake_activates_and_reset_stops() {
        let (mut t, on) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 19);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 is offered");
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1 | 0x8000_0000); // VERSION_1 plus a bit never offered
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(&mut t, 0x70, s);
        assert_eq!(r(&mut t, 0x70), s);
        assert_eq!(t.driver_features, VIRTIO_F_VERSION_1);
        for (q, base) in [(0u32, 0x10_000u32), (1, 0x20_000)] {
            w(&mut t, 0x30, q);
            assert_eq!(r(&mut t, 0x34), 16);
            w(&mut t, 0x38, 16);
            w(&mut t, 0x80, base);
            w(&mut t, 0x90, base + 0x1000);
            w(&mut t, 0xa0, base + 0x2000);
            w(&mut t, 0x44, 1);
        }
        w(&mut t, 0x70, s | STATUS_DRIVER_OK);
        assert!(on.load(Ordering::SeqCst));
        // Queue registers are frozen once the device runs.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x44, 0);
        assert_eq!(r(&mut t, 0x44), 1);
        assert_eq!(r(&mut t, 0x104), 0x0505_0505);
        w(&mut t, 0x70, 0);
        assert!(!on.load(Ordering::SeqCst));
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn legacy_driver_and_bad_queues_are_refused() {
        let (mut t, on) = transport();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        w(&mut t, 0x70, 0);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(&mut t, 0x70, s);
        // No queue was made ready: activation fails and asks for a reset.
        w(&mut t, 0x70, s | STATUS_DRIVER_OK);
        assert!(!on.load(Ordering::SeqCst));
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, 0x60), INT_CONFIG);
        w(&mut t, 0x64, INT_CONFIG);
        assert_eq!(r(&mut t, 0x60), 0);
    }
}
