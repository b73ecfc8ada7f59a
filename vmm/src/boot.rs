//! Loads what the guest boots from: the ELF kernel, the initrd and the command
//! line, and writes the boot structures around them.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::arch::x86_64::boot_params::{self, InitrdPlacement};
use crate::arch::x86_64::layout::{
    ram_regions, CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, INITRD_ADDR_MAX, MMIO_GAP_START,
    ZERO_PAGE_ADDR,
};
use crate::arch::x86_64::mptable;
use crate::vstate::memory::GuestMemory;

const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is a compressed bzImage; sbx boots the uncompressed ELF `vmlinux` from the kernel build tree (cargo xtask kernel builds one)")]
    KernelIsBzImage { path: PathBuf },
    #[error("kernel {path} is not an ELF vmlinux ({detail}); pass the uncompressed `vmlinux` from a kernel build (cargo xtask kernel builds one)")]
    KernelNotElf { path: PathBuf, detail: String },
    #[error("guest memory of {mem_mib} MiB is too small: the kernel{what} needs at least {need_mib} MiB; give the VM more memory")]
    MemoryTooSmall {
        mem_mib: u64,
        need_mib: u64,
        what: &'static str,
    },
    #[error("cannot load kernel {path} into guest memory: {detail}")]
    KernelLoad { path: PathBuf, detail: String },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel command line is {len} bytes; the limit is {} bytes", CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong { len: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// What the boot vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: u64,
    pub zero_page: u64,
}

/// Highest end address (`p_paddr + p_memsz`) of the ELF's loadable segments.
/// Checked before loading so that too little memory gets a clear error.
fn elf_end(path: &Path, image: &[u8]) -> Result<u64, BootError> {
    let not_elf = |detail: &str| BootError::KernelNotElf {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    };
    if image.len() > 0x206 && &image[0x202..0x206] == b"HdrS" {
        return Err(BootError::KernelIsBzImage {
            path: path.to_path_buf(),
        });
    }
    if image.len() < 64 || &image[0..4] != b"\x7fELF" {
        return Err(not_elf("no ELF magic"));
    }
    if image[4] != 2 || image[5] != 1 {
        return Err(not_elf("not a 64-bit little-endian ELF"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([image[o], image[o + 1]]);
    let u64_at = |o: usize| {
        image
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    if u16_at(18) != 62 {
        return Err(not_elf("not an x86_64 ELF"));
    }
    let phoff = u64_at(32).ok_or_else(|| not_elf("truncated header"))? as usize;
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    let mut end = 0;
    for i in 0..phnum {
        let ph = phoff.saturating_add(i.saturating_mul(phentsize));
        let p_type = image
            .get(ph..ph + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
            .ok_or_else(|| not_elf("truncated program headers"))?;
        if p_type != 1 {
            continue;
        }
        let paddr = u64_at(ph + 24).ok_or_else(|| not_elf("truncated program headers"))?;
        let memsz = u64_at(ph + 40).ok_or_else(|| not_elf("truncated program headers"))?;
        end = end.max(paddr.saturating_add(memsz));
    }
    if end == 0 {
        return Err(not_elf("no loadable segments"));
    }
    Ok(end)
}

/// The start of the kernel image: enough for the ELF and bzImage headers and
/// the program header table, without reading the whole (large) file.
fn read_headers(file: &mut File) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(64 * 1024);
    file.by_ref().take(64 * 1024).read_to_end(&mut head)?;
    Ok(head)
}

fn mib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Loads kernel, initrd and command line and writes boot parameters and the MP table.
pub fn load(
    mem: &GuestMemory,
    mem_mib: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
) -> Result<BootEntry, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: kernel.to_path_buf(),
        source,
    };
    let mut file = File::open(kernel).map_err(read_err)?;
    let kernel_end = elf_end(kernel, &read_headers(&mut file).map_err(read_err)?)?;
    let low_end = (mem_mib << 20).min(MMIO_GAP_START);
    if kernel_end > low_end {
        return Err(BootError::MemoryTooSmall {
            mem_mib,
            need_mib: mib_ceil(kernel_end),
            what: "",
        });
    }

    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::KernelLoad {
            path: kernel.to_path_buf(),
            detail: e.to_string(),
        }
    })?;

    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, mem_mib, path, kernel_end, low_end)?),
        None => None,
    };

    let bytes = cmdline.as_bytes();
    if bytes.contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    if bytes.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong { len: bytes.len() });
    }
    let mut with_nul = bytes.to_vec();
    with_nul.push(0);
    mem.write_slice(&with_nul, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| BootError::GuestWrite("the command line"))?;

    let params = boot_params::build(&ram_regions(mem_mib << 20), with_nul.len(), initrd)?;
    boot_params::write(mem, &params)?;
    mptable::setup(mem, vcpus)?;

    Ok(BootEntry {
        entry: loaded.kernel_load.0,
        zero_page: ZERO_PAGE_ADDR,
    })
}

/// Places the initrd as high in low memory as the kernel accepts, page aligned.
fn load_initrd(
    mem: &GuestMemory,
    mem_mib: u64,
    path: &Path,
    kernel_end: u64,
    low_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = low_end.min(INITRD_ADDR_MAX + 1);
    let kernel_top = kernel_end.div_ceil(PAGE) * PAGE;
    let addr = top.checked_sub(size).map(|a| a & !(PAGE - 1));
    match addr {
        Some(addr) if addr >= kernel_top => {
            // Straight from the file into guest memory: no copy of tens
            // of MiB through the heap on every boot.
            mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
                .map_err(|e| match e {
                    GuestMemoryError::IOError(e) => read_err(e),
                    _ => BootError::GuestWrite("the initrd"),
                })?;
            Ok(InitrdPlacement { addr, size })
        }
        _ => Err(BootError::MemoryTooSmall {
            mem_mib,
            need_mib: mib_ceil(kernel_top + size + PAGE),
            what: " and initrd",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf_and_bzimage() {
        let p = Path::new("k");
        assert!(matches!(
            elf_end(p, b"hello world"),
            Err(BootError::KernelNotElf { .. })
        ));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(matches!(
            elf_end(p, &bz),
            Err(BootError::KernelIsBzImage { .. })
        ));
        let mut trunc = vec![0u8; 64];
        trunc[0..4].copy_from_slice(b"\x7fELF");
        trunc[4] = 2;
        trunc[5] = 1;
        trunc[18] = 62;
        trunc[32] = 0xff; // program headers past the end
        trunc[56] = 1;
        assert!(elf_end(p, &trunc).is_err());
    }

    #[test]
    fn finds_end_of_loadable_segments() {
        let mut img = vec![0u8; 64 + 56 * 2];
        img[0..4].copy_from_slice(b"\x7fELF");
        img[4] = 2;
        img[5] = 1;
        img[18] = 62;
        img[32] = 64; // e_phoff
        img[54] = 56; // e_phentsize
        img[56] = 2; // e_phnum
        for (i, (paddr, memsz)) in [(0x100_0000u64, 0x20_0000u64), (0x140_0000, 0x10)]
            .into_iter()
            .enumerate()
        {
            let ph = 64 + 56 * i;
            img[ph] = 1;
            img[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
            img[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        assert_eq!(elf_end(Path::new("k"), &img).unwrap(), 0x140_0010);
    }
}
