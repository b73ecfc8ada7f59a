//! The session's secrets as the proxy holds them: each real value stays in
//! this process; the guest gets a placeholder that means nothing elsewhere.

use std::fmt::Write as _;

/// Every placeholder starts with this, so one search finds them all.
pub const PREFIX: &[u8] = b"sbx-secret-";

pub struct Secret {
    pub name: String,
    /// The guest environment variable that holds the placeholder.
    pub env: String,
    pub placeholder: String,
    value: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("env", &self.env)
            .finish_non_exhaustive()
    }
}

impl Secret {
    pub fn value(&self) -> &str {
        &self.value
    }
}

#[derive(Debug, Default)]
pub struct Secrets(Vec<Secret>);

impl Secrets {
    /// `(name, env, value)` for each secret the session may use; each gets a
    /// fresh random placeholder.
    pub fn new(list: Vec<(String, String, String)>) -> Result<Secrets, getrandom::Error> {
        let mut out = Vec::new();
        for (name, env, value) in list {
            let mut raw = [0u8; 12];
            getrandom::fill(&mut raw)?;
            let mut placeholder = format!("sbx-secret-{name}-");
            for b in raw {
                let _ = write!(placeholder, "{b:02x}");
            }
            out.push(Secret {
                name,
                env,
                placeholder,
                value,
            });
        }
        Ok(Secrets(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.0.iter()
    }

    /// The secrets whose placeholder occurs in `bytes`.
    pub fn found_in(&self, bytes: &[u8]) -> Vec<&Secret> {
        let mut found: Vec<&Secret> = Vec::new();
        let mut at = 0;
        while let Some(i) = crate::head::find(&bytes[at..], PREFIX) {
            let rest = &bytes[at + i..];
            for s in &self.0 {
                if rest.starts_with(s.placeholder.as_bytes())
                    && !found.iter().any(|f| f.name == s.name)
                {
                    found.push(s);
                }
            }
            at += i + PREFIX.len();
        }
        found
    }
}

/// `bytes` with every `from` replaced by `to`.
pub fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(i) = crate::head::find(&bytes[at..], from) {
        out.extend_from_slice(&bytes[at..at + i]);
        out.extend_from_slice(to);
        at += i + from.len();
    }
    out.extend_from_slice(&bytes[at..]);
    out
}

/// Finds placeholders in a body that arrives in pieces: a placeholder split
/// across two pieces is still found.
pub struct BodyScanner {
    carry: Vec<u8>,
    longest: usize,
}

impl BodyScanner {
    pub fn new(secrets: &Secrets) -> Self {
        BodyScanner {
            carry: Vec::new(),
            longest: secrets
                .0
                .iter()
                .map(|s| s.placeholder.len())
                .max()
                .unwrap_or(0),
        }
    }

    /// The secrets whose placeholder ends in `piece`.
    pub fn scan<'s>(&mut self, secrets: &'s Secrets, piece: &[u8]) -> Vec<&'s Secret> {
        if self.longest == 0 {
            return Vec::new();
        }
        self.carry.extend_from_slice(piece);
        let found = secrets.found_in(&self.carry);
        let keep = self.longest.saturating_sub(1).min(self.carry.len());
        self.carry.drain(..self.carry.len() - keep);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_whole_and_across_pieces() {
        let s = Secrets::new(vec![
            ("GH".into(), "GH".into(), "real-gh".into()),
            ("NPM".into(), "NPM".into(), "real-npm".into()),
        ])
        .unwrap();
        let gh = s.iter().next().unwrap().placeholder.clone();
        assert!(gh.starts_with("sbx-secret-GH-") && gh.len() == "sbx-secret-GH-".len() + 24);
        let text = format!("Bearer {gh} and sbx-secret-NPM-guess");
        let found = s.found_in(text.as_bytes());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "GH");
        let mut scan = BodyScanner::new(&s);
        let (a, b) = gh.as_bytes().split_at(9);
        assert!(scan.scan(&s, a).is_empty());
        assert_eq!(scan.scan(&s, b)[0].name, "GH");
        assert_eq!(replace(b"x-A-A", b"A", b"bb"), b"x-bb-bb");
    }
}
