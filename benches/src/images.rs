//! What the benchmarks that boot guests are given: sbx, kernel and initramfs.

use std::ffi::OsString;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Images {
    /// The sbx binary (a release build gives representative numbers).
    #[arg(long)]
    pub sbx: PathBuf,
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: PathBuf,
}

impl Images {
    /// `--kernel K --initrd I`, for `sbx boot` and `sbx start`.
    pub fn boot_args(&self) -> [OsString; 4] {
        [
            "--kernel".into(),
            self.kernel.clone().into(),
            "--initrd".into(),
            self.initrd.clone().into(),
        ]
    }
}
