//! Errors from loading policy: each names the file, and where it can, the
//! line and column and what to write instead.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text is not a valid policy.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: cannot read policy file: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// A signed bundle that must not be used, and why.
    #[error("{file}: refused: {reason}")]
    Bundle { file: String, reason: String },
    #[error("unknown preset `{0}`: the presets are locked-down, balanced and open")]
    UnknownPreset(String),
    // The cause is in the message, not a `source`, so it is said once.
    #[error("cannot read trusted key {}: {error}", path.display())]
    KeyRead { path: PathBuf, error: io::Error },
    #[error("{}: {error}", path.display())]
    Key {
        path: PathBuf,
        error: crate::KeyError,
    },
    /// Two layers say contradictory things that cannot be merged safely.
    #[error("{0}")]
    Conflict(String),
}

impl PolicyError {
    pub(crate) fn invalid(src: &crate::Source, offset: usize, message: impl Into<String>) -> Self {
        let (line, column) = src.line_col(offset);
        PolicyError::Invalid {
            file: src.name.to_string(),
            line,
            column,
            message: message.into(),
        }
    }
}
