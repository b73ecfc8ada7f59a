//! Signed policy bundles: a policy file with an ed25519 signature in front,
//! so that an organisation's guardrails cannot be edited on the way to a
//! developer's machine.
//!
//! ```text
//! sbx-policy-bundle v1
//! key: <base64 public key>
//! signature: <base64 signature over the first line, a newline, and the policy>
//! ---
//! <the policy, unchanged>
//! ```
//!
//! Version 2 (what a control plane serves) adds a line `expires: <unix
//! seconds>` after the signature, covered by it: past that time the bundle
//! is refused, so a machine cut off from its server fails closed instead of
//! running an old policy forever.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

const MAGIC: &str = "sbx-policy-bundle v1";
const MAGIC_V2: &str = "sbx-policy-bundle v2";
const SECRET_TAG: &str = "sbx-ed25519-secret";
const PUBLIC_TAG: &str = "sbx-ed25519-public";
/// Lines before the policy text in a bundle (v1; v2 has one more).
const HEADER_LINES: usize = 4;

/// Lines before the policy in a bundle from [`sign_until`]: its line N is
/// the policy text's line N minus this.
pub const UNTIL_HEADER_LINES: usize = HEADER_LINES + 1;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an sbx {0} key: expected one line `{1} <base64>`")]
    Format(&'static str, &'static str),
    #[error("cannot get random bytes for a key: {0}")]
    Random(String),
}

pub fn generate_key() -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn encode_secret_key(k: &SigningKey) -> String {
    format!("{SECRET_TAG} {}\n", B64.encode(k.to_bytes()))
}

pub fn encode_public_key(k: &VerifyingKey) -> String {
    format!("{PUBLIC_TAG} {}\n", B64.encode(k.to_bytes()))
}

fn decode<const N: usize>(text: &str, tag: &str) -> Option<[u8; N]> {
    let b64 = text.trim().strip_prefix(tag)?.trim();
    B64.decode(b64).ok()?.try_into().ok()
}

pub fn decode_secret_key(text: &str) -> Result<SigningKey, KeyError> {
    decode::<32>(text, SECRET_TAG)
        .map(|b| SigningKey::from_bytes(&b))
        .ok_or(KeyError::Format("secret", SECRET_TAG))
}

pub fn decode_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    decode::<32>(text, PUBLIC_TAG)
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or(KeyError::Format("public", PUBLIC_TAG))
}

/// A short, printable name for a public key.
pub fn key_id(k: &VerifyingKey) -> String {
    B64.encode(k.to_bytes())[..16].to_string()
}

fn signed_message(policy: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(MAGIC.len() + 1 + policy.len());
    m.extend_from_slice(MAGIC.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(policy.as_bytes());
    m
}

/// Wraps a policy text in a signed bundle.
pub fn sign(policy: &str, key: &SigningKey) -> String {
    let sig = key.sign(&signed_message(policy));
    format!(
        "{MAGIC}\nkey: {}\nsignature: {}\n---\n{policy}",
        B64.encode(key.verifying_key().to_bytes()),
        B64.encode(sig.to_bytes())
    )
}

/// What a v2 signature covers: the first line, the expiry line, the policy.
fn signed_message_v2(policy: &str, expires: i64) -> Vec<u8> {
    format!("{MAGIC_V2}\nexpires: {expires}\n{policy}").into_bytes()
}

/// Wraps a policy text in a signed bundle that is refused after `expires`
/// (seconds since the epoch).
pub fn sign_until(policy: &str, key: &SigningKey, expires: i64) -> String {
    let sig = key.sign(&signed_message_v2(policy, expires));
    format!(
        "{MAGIC_V2}\nkey: {}\nsignature: {}\nexpires: {expires}\n---\n{policy}",
        B64.encode(key.verifying_key().to_bytes()),
        B64.encode(sig.to_bytes())
    )
}

pub fn is_bundle(text: &str) -> bool {
    text.starts_with(MAGIC) || text.starts_with(MAGIC_V2)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The policy inside a verified bundle.
#[derive(Debug)]
pub struct Opened<'a> {
    pub policy: &'a str,
    pub line_offset: usize,
    pub key: VerifyingKey,
}

/// Checks a bundle's signature and that its key is trusted; the error says
/// why it must not be used.
pub fn open<'a>(text: &'a str, trusted: &[VerifyingKey]) -> Result<Opened<'a>, String> {
    let v2 = text.starts_with(MAGIC_V2);
    let header = if v2 { UNTIL_HEADER_LINES } else { HEADER_LINES };
    let mut lines = text.splitn(header + 1, '\n');
    let mut next = || lines.next().unwrap_or("");
    let first = next();
    if first != MAGIC && first != MAGIC_V2 {
        return Err(format!("the first line is not `{MAGIC}` or `{MAGIC_V2}`"));
    }
    let key_b64 = next()
        .strip_prefix("key: ")
        .ok_or("line 2 is not `key: <base64>`")?;
    let sig_b64 = next()
        .strip_prefix("signature: ")
        .ok_or("line 3 is not `signature: <base64>`")?;
    let expires = if v2 {
        Some(
            next()
                .strip_prefix("expires: ")
                .and_then(|e| e.trim().parse::<i64>().ok())
                .ok_or("line 4 is not `expires: <seconds since 1970>`")?,
        )
    } else {
        None
    };
    if next() != "---" {
        return Err(format!("line {header} is not `---`"));
    }
    let policy = next();
    let key = B64
        .decode(key_b64)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or("the key on line 2 is not an ed25519 public key")?;
    let sig = B64
        .decode(sig_b64)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| Signature::from_bytes(&b))
        .ok_or("the signature on line 3 is not an ed25519 signature")?;
    let message = match expires {
        Some(e) => signed_message_v2(policy, e),
        None => signed_message(policy),
    };
    key.verify(&message, &sig).map_err(|_| {
        "the signature does not match the policy: the bundle was changed after it was signed"
            .to_string()
    })?;
    if !trusted.contains(&key) {
        return Err(if trusted.is_empty() {
            format!(
                "signed by key {}, but no keys are trusted: add the organisation's public key to /etc/sbx/trusted-keys/ or pass --trusted-key",
                key_id(&key)
            )
        } else {
            format!("signed by key {}, which is not a trusted key", key_id(&key))
        });
    }
    if let Some(e) = expires {
        let late = now() - e;
        if late > 0 {
            return Err(format!(
                "it expired {} ago (its server renews it at every session start: reconnect to the server, or sign in again with `sbx login URL`)",
                human_duration(late)
            ));
        }
    }
    Ok(Opened {
        policy,
        line_offset: header,
        key,
    })
}

fn human_duration(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v2_bundle_carries_a_signed_expiry() {
        let k = generate_key().unwrap();
        let b = sign_until("version = 1\n", &k, now() + 60);
        let o = open(&b, &[k.verifying_key()]).unwrap();
        assert_eq!((o.policy, o.line_offset), ("version = 1\n", 5));
        // Moving the expiry breaks the signature; a past one is refused.
        let later = b.replace(
            &format!("expires: {}", now() + 60),
            &format!("expires: {}", now() + 9999),
        );
        assert!(open(&later, &[k.verifying_key()])
            .unwrap_err()
            .contains("changed after"));
        let old = sign_until("version = 1\n", &k, now() - 3600);
        let e = open(&old, &[k.verifying_key()]).unwrap_err();
        assert!(e.contains("expired 60 min ago"), "{e}");
    }

    #[test]
    fn sign_and_open() {
        let k = generate_key().unwrap();
        let b = sign("version = 1\n", &k);
        let o = open(&b, &[k.verifying_key()]).unwrap();
        assert_eq!(o.policy, "version = 1\n");
        let other = generate_key().unwrap();
        assert!(open(&b, &[other.verifying_key()])
            .unwrap_err()
            .contains("not a trusted key"));
        assert!(open(&b, &[]).unwrap_err().contains("no keys are trusted"));
        let tampered = b.replace("version = 1", "version = 2");
        assert!(open(&tampered, &[k.verifying_key()])
            .unwrap_err()
            .contains("changed after"));
        let k2 = decode_secret_key(&encode_secret_key(&k)).unwrap();
        assert_eq!(k2.to_bytes(), k.to_bytes());
        let p = decode_public_key(&encode_public_key(&k.verifying_key())).unwrap();
        assert_eq!(p, k.verifying_key());
        assert!(decode_public_key("garbage").is_err());
    }
}
