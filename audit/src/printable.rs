//! Records carry text the guest chose (file names, command lines, console
//! lines). Shown to a person it is data, never markup: a newline could
//! forge a whole record line, an escape sequence could rewrite the
//! reader's terminal, a bidirectional override could reorder what they
//! read. JSON output is exact and needs none of this; text output does.

use std::borrow::Cow;
use std::fmt::Write;

/// Characters that change how text around them is shown: the bidirectional
/// embeddings, overrides and isolates, and the line and paragraph separators.
fn reorders(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

/// `text` with every control character (C0, DEL, C1) and every character
/// that reorders or breaks lines written as an escape (`\n`, `\t`, `\r`,
/// `\\`, `\x1b`, `\u{202e}`), so one record stays one line of plain text.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() || reorders(c) || c == '\\')
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() || reorders(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_stays_one_plain_line() {
        assert!(matches!(printable("src/main.rs"), Cow::Borrowed(_)));
        assert_eq!(printable("ünïcödé 文件"), "ünïcödé 文件");
        assert_eq!(
            printable("a\nFAKE RECORD\x1b[2J\x1b]0;title\x07"),
            "a\\nFAKE RECORD\\x1b[2J\\x1b]0;title\\x07"
        );
        assert_eq!(printable("tab\there\r"), "tab\\there\\r");
        assert_eq!(printable("\u{9b}31m \u{7f}"), "\\u{9b}31m \\x7f");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        // A literal backslash is doubled, so an escape cannot be faked.
        assert_eq!(printable("a\\nb"), "a\\\\nb");
    }
}
