//! Where rules and errors come from: a named text and 1-based lines and columns.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// A place in a policy file. Rules carry one so that every decision can say
/// which line of which file made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Location {
    pub file: Arc<str>,
    pub line: usize,
}

impl Location {
    /// The place of rules that no file wrote (the default deny, for instance).
    pub fn builtin() -> Self {
        Location {
            file: Arc::from("builtin"),
            line: 0,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}", self.file, self.line)
        }
    }
}

/// A policy text and the name to report it under.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: Arc<str>,
    pub text: String,
    /// Lines that precede `text` in the file (a signed bundle's header), so
    /// that reported lines match what the user sees in their editor.
    pub line_offset: usize,
}

impl Source {
    pub fn new(name: impl Into<Arc<str>>, text: impl Into<String>) -> Self {
        Source {
            name: name.into(),
            text: text.into(),
            line_offset: 0,
        }
    }

    /// 1-based line and column (in characters) of a byte offset into `text`.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let mut start = offset;
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line + self.line_offset, column)
    }

    pub fn location(&self, offset: usize) -> Location {
        Location {
            file: self.name.clone(),
            line: self.line_col(offset).0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns_are_one_based() {
        let s = Source::new("f", "a = 1\nbé = 2\n");
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(6), (2, 1));
        // Column counts characters, not bytes: `=` follows "bé ".
        assert_eq!(s.line_col(10), (2, 4));
        // Inside a multi-byte character, and past the end, do not panic.
        assert_eq!(s.line_col(8), (2, 2));
        assert_eq!(s.line_col(999).0, 3);
    }

    #[test]
    fn bundle_offset_shifts_lines() {
        let mut s = Source::new("b", "x = 1\n");
        s.line_offset = 4;
        assert_eq!(s.line_col(0), (5, 1));
    }
}
