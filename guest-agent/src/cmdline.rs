//! The guest's command comes from the kernel command line after `--`.
//!
//! The kernel also hands init every parameter it does not recognise (such as
//! `noxsave`) as an argument, so `argv` alone cannot tell where the command
//! starts; `/proc/cmdline` can.

/// Splits a kernel command line the way the kernel does: on spaces, with
/// double quotes grouping (and removed).
pub fn split(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    out.push(std::mem::take(&mut cur));
                    has_word = false;
                }
            }
            c => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        out.push(cur);
    }
    out
}

/// The words after the first `--`, or None when there is no `--`.
pub fn command(line: &str) -> Option<Vec<String>> {
    let words = split(line);
    let at = words.iter().position(|w| w == "--")?;
    Some(words[at + 1..].to_vec())
}

/// Whether `word` appears among the kernel parameters (before any `--`).
pub fn has_param(line: &str, word: &str) -> bool {
    split(line)
        .iter()
        .take_while(|w| *w != "--")
        .any(|w| w == word)
}

/// The values of every `key=value` parameter before `--`, in order.
pub fn values(line: &str, key: &str) -> Vec<String> {
    split(line)
        .into_iter()
        .take_while(|w| w != "--")
        .filter_map(|w| {
            w.strip_prefix(key)
                .and_then(|r| r.strip_prefix('='))
                .map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_before_the_command() {
        let line = "quiet sbx.fs=sbx0,/workspace,rw sbx.fs=sbx1,/ref,ro -- sbx.fs=no";
        assert_eq!(
            values(line, "sbx.fs"),
            ["sbx0,/workspace,rw", "sbx1,/ref,ro"]
        );
        assert!(values(line, "sbx.f").is_empty());
    }

    #[test]
    fn command_follows_double_dash() {
        let line = "console=ttyS0 quiet noxsave -- sh -c \"echo hi; exit 3\" \"\"\n";
        assert_eq!(command(line).unwrap(), ["sh", "-c", "echo hi; exit 3", ""]);
        assert_eq!(command("console=ttyS0 quiet"), None);
        assert_eq!(command("a -- ").unwrap(), Vec::<String>::new());
        assert!(has_param("quiet sbx.session -- x", "sbx.session"));
        assert!(!has_param("quiet -- sbx.session", "sbx.session"));
    }
}
