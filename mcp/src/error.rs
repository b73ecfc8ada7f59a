//! What can go wrong in the gateway, each naming what failed and what to do.

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("{at}: {message}")]
    Config { at: String, message: String },
    #[error("MCP server `{server}`: {message}")]
    Server { server: String, message: String },
    #[error("tool pins in {path}: {message}")]
    Pins { path: String, message: String },
    #[error("{0}")]
    Audit(#[from] sbx_audit::AuditError),
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, McpError>;
