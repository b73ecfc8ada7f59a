//! What can go wrong assembling or driving a session. Each message names
//! what failed and, where there is one, what to do.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec or a request is wrong: the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// The policy refused; the message names the rule.
    #[error("{0}")]
    Denied(String),
    /// A host file, directory, socket or thread could not be used.
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
    #[error("cannot load the policy: {0}")]
    Policy(sbx_policy::PolicyError),
    #[error(transparent)]
    Audit(#[from] sbx_audit::AuditError),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    #[error(transparent)]
    Host(#[from] vmm::host::HostError),
    #[error(transparent)]
    Image(sbx_image::ImageError),
    /// A session did not come up, or is not in a state to do what was asked.
    #[error("{0}")]
    Session(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Names what an I/O error was doing: `.at(|| format!("cannot create {}", p.display()))`.
pub(crate) trait At<T> {
    fn at(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> At<T> for io::Result<T> {
    fn at(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|error| Error::Io {
            what: what(),
            error,
        })
    }
}

/// `return Err(Error::$kind(format!(...)))`.
macro_rules! fail {
    ($kind:ident, $($fmt:tt)*) => {
        return Err($crate::Error::$kind(format!($($fmt)*)))
    };
}
pub(crate) use fail;
