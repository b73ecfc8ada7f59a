//! Reports to the VMM through the debug port (`sbx_protocol::debug_port`).

use std::sync::OnceLock;

use sbx_protocol::debug_port::{Report, PORT};

/// Port access needs `ioperm`, granted once; outside a VM (or without
/// CAP_SYS_RAWIO) reports are skipped rather than faulting.
fn port_access() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        unsafe { libc::ioperm(libc::c_ulong::from(PORT), 4, 1) == 0 }
    })
}

pub fn send(report: Report) {
    if !port_access() {
        return;
    }
    let value = report.encode();
    // SAFETY: the port was granted by ioperm above; in a VM the write traps to the VMM.
    unsafe {
        std::arch::asm!("out dx, eax", in("dx") PORT, in("eax") value, options(nomem, nostack));
    }
}
