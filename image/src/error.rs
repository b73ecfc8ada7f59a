//! What can go wrong with images. Each message names the image, file or
//! digest concerned and, where there is one, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Content that does not match its digest: altered in transit or at rest.
    #[error("blob {expected} does not match its digest (its bytes hash to {actual}); it was altered or damaged, so it is refused")]
    Digest { expected: String, actual: String },
    /// An archive or manifest that is not what it claims.
    #[error("{0}")]
    Malformed(String),
    #[error("image {name} is for {found}; sbx guests are linux/amd64. Pick the image's linux/amd64 variant")]
    Platform { name: String, found: String },
    #[error("no image named {0}; `sbx image ls` lists them, `sbx image pull` or `sbx image import` adds one")]
    NotFound(String),
    #[error("image {0} is in use by a running session; stop it first")]
    InUse(String),
    #[error("cannot {what}: {tool} failed: {detail}")]
    Tool {
        what: String,
        tool: &'static str,
        detail: String,
    },
    #[error("{0}")]
    Registry(String),
    #[error("the image store {} is locked by another sbx; try again when it finishes", .0.display())]
    Locked(PathBuf),
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Names what an I/O error was doing.
pub(crate) trait At<T> {
    fn at(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> At<T> for std::io::Result<T> {
    fn at(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| ImageError::Io {
            what: what(),
            source,
        })
    }
}

macro_rules! malformed {
    ($($fmt:tt)*) => {
        return Err($crate::error::ImageError::Malformed(format!($($fmt)*)))
    };
}
pub(crate) use malformed;
