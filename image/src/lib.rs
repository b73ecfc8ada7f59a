//! sbx guest images: OCI images pulled from a registry or imported from a
//! tarball, every blob checked against its digest, and each turned once
//! into a read-only ext4 file system that sessions boot from.

pub mod archive;
pub mod digest;
pub mod error;
pub mod ext4;
pub mod layout;
pub mod manifest;
pub mod pull;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod unpack;

pub use digest::Digest;
pub use error::{ImageError, Result};
pub use store::{ImageRecord, Store};
