//! Tool names as the agent sees them: `server__tool`. Server names hold no
//! `_` (see `config::check_name`), so a name splits one way only and two
//! servers cannot shadow each other's tools. `__` rather than `.` because
//! the models' tool-name rules (`^[a-zA-Z0-9_-]{1,64}$`) refuse dots.

pub const SEPARATOR: &str = "__";

/// The name the agent sees for `tool` of `server`.
pub fn exposed(server: &str, tool: &str) -> String {
    format!("{server}{SEPARATOR}{tool}")
}

/// `(server, tool)` from a name the agent called; also accepts
/// `server.tool`, as people write it (`sbx mcp call`).
pub fn split(name: &str) -> Option<(&str, &str)> {
    let (server, tool) = name
        .split_once(SEPARATOR)
        .or_else(|| name.split_once('.'))?;
    (!server.is_empty() && !tool.is_empty()).then_some((server, tool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            split(&exposed("files", "read__x")),
            Some(("files", "read__x"))
        );
        assert_eq!(split("files.read"), Some(("files", "read")));
        assert_eq!(split("files"), None);
        assert_eq!(split("__x"), None);
    }
}
