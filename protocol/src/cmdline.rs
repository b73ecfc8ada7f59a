//! The boot contract: what the host tells the guest agent on the kernel
//! command line, encoded by the host and parsed by the agent in this one
//! module.
//!
//! `sbx.*` parameters come before `--`; the guest command, when there is
//! one, comes after it. The kernel hands init every parameter it does not
//! recognise as an argument too, so the agent reads `/proc/cmdline` rather
//! than its argv to tell parameters from the command.

/// What every sbx guest gets first: serial console, `reboot=k` so that a
/// guest reboot ends the VM, a panic that reboots at once instead of
/// hanging, and `tsc=reliable`: the guest keeps time by kvm-clock, and the
/// clocksource watchdog that would check the TSC against it every half
/// second only wakes an idle guest (6.6 timer interrupts a second idle
/// without it, 4.0 with, in the nested test host).
pub const BASE: &str = "console=ttyS0 reboot=k panic=-1 quiet tsc=reliable";

/// The agent serves the host over vsock instead of running one command.
pub const SESSION: &str = "sbx.session";
/// A virtio-fs share to mount: `sbx.fs=TAG,GUEST_PATH,ro|rw`.
pub const SHARE: &str = "sbx.fs";
/// Where commands start when a request names no directory.
pub const WORKDIR: &str = "sbx.workdir";
/// The root file system from disks: `sbx.root=[SAVED:...:]IMAGE[,LAYER]`,
/// each the serial of a virtio-blk device: IMAGE read-only; each SAVED a
/// read-only layer saved from an earlier session (a template build), whose
/// `upper/` stacks over the image, the first topmost; LAYER the writable
/// layer joined over them all (a RAM-backed layer when absent).
pub const ROOT: &str = "sbx.root";
/// Where a saved layer's disk holds its tree: a session's writable layer,
/// kept as it was, is overlayfs's upper directory.
pub const SAVED_TREE: &str = "upper";
/// The session CA (its PEM body: the base64 of the DER, no line breaks);
/// present only when the session has egress.
pub const EGRESS_CA: &str = "sbx.egress";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("guest command argument {0:?} contains a double quote, which the kernel command line cannot carry")]
    Quote(String),
    #[error("the disk serial {0:?} is not 1 to 20 letters, digits, '-', '_' or '.'")]
    Serial(String),
    #[error(
        "the guest path {path:?} contains {found:?}; use letters, digits, '/', '-', '_' and '.'"
    )]
    GuestPath { path: String, found: char },
}

/// One virtio-fs share, as the agent mounts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub guest_path: String,
    pub read_only: bool,
}

/// The disks the guest's root is made of, by serial (at most 20 bytes:
/// letters, digits, `-`, `_`, `.`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    /// Saved layers over the image, topmost first.
    pub saved: Vec<String>,
    pub image: String,
    pub layer: Option<String>,
}

/// The session has an MCP gateway: the guest agent relays to it and points
/// the common agents at it.
pub const MCP: &str = "sbx.mcp";

/// Everything the host says at boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Boot {
    /// Serve the host over vsock ([`SESSION`]).
    pub session: bool,
    pub shares: Vec<Share>,
    pub workdir: Option<String>,
    /// A root from disks ([`ROOT`]); the initramfs stays the root when None.
    pub root: Option<Root>,
    /// The session CA's PEM body ([`EGRESS_CA`]).
    pub egress_ca: Option<String>,
    /// The session has an MCP gateway ([`MCP`]).
    pub mcp: bool,
    /// The command after `--`; None when there is no `--`.
    pub command: Option<Vec<String>>,
}

/// Guest paths travel inside `sbx.fs=` words: no spaces, commas or quotes.
pub fn check_guest_path(path: &str) -> Result<(), CmdlineError> {
    match path
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, ',' | '"' | '\0'))
    {
        Some(found) => Err(CmdlineError::GuestPath {
            path: path.to_string(),
            found,
        }),
        None => Ok(()),
    }
}

/// Disk serials travel in `sbx.root=` and are what the guest finds its
/// disks by; the device holds 20 bytes.
pub fn check_serial(serial: &str) -> Result<(), CmdlineError> {
    let ok = (1..=20).contains(&serial.len())
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CmdlineError::Serial(serial.to_string()))
    }
}

/// Quotes one argument for the kernel command line, which splits on spaces
/// and honours double quotes but has no escape for a quote itself.
fn quote_arg(arg: &str) -> Result<String, CmdlineError> {
    if arg.contains('"') {
        return Err(CmdlineError::Quote(arg.to_string()));
    }
    if arg.is_empty() || arg.contains(char::is_whitespace) {
        Ok(format!("\"{arg}\""))
    } else {
        Ok(arg.to_string())
    }
}

impl Boot {
    /// The whole command line: `base`, then the `extra` words (host quirks
    /// such as `noxsave`), then this contract's parameters, then the command.
    pub fn encode(&self, base: &str, extra: &[&str]) -> Result<String, CmdlineError> {
        let mut words: Vec<String> = base.split_whitespace().map(str::to_string).collect();
        for w in extra {
            if !words.iter().any(|have| have == w) {
                words.push(w.to_string());
            }
        }
        if self.session {
            words.push(SESSION.into());
        }
        for s in &self.shares {
            check_guest_path(&s.guest_path)?;
            let mode = if s.read_only { "ro" } else { "rw" };
            words.push(format!("{SHARE}={},{},{mode}", s.tag, s.guest_path));
        }
        if let Some(w) = &self.workdir {
            check_guest_path(w)?;
            words.push(format!("{WORKDIR}={w}"));
        }
        if let Some(root) = &self.root {
            let mut word = format!("{ROOT}=");
            for saved in &root.saved {
                word.push_str(saved);
                word.push(':');
            }
            word.push_str(&root.image);
            if let Some(layer) = &root.layer {
                word.push(',');
                word.push_str(layer);
            }
            for serial in root.saved.iter().chain([&root.image]).chain(&root.layer) {
                check_serial(serial)?;
            }
            words.push(word);
        }
        if let Some(ca) = &self.egress_ca {
            words.push(format!("{EGRESS_CA}={ca}"));
        }
        if self.mcp {
            words.push(MCP.into());
        }
        if let Some(command) = &self.command {
            words.push("--".into());
            for a in command {
                words.push(quote_arg(a)?);
            }
        }
        Ok(words.join(" "))
    }

    /// Reads what [`Boot::encode`] wrote. Malformed shares are returned as
    /// errors beside the rest, so the agent can say so and carry on.
    pub fn parse(line: &str) -> (Boot, Vec<String>) {
        let words = split(line);
        let at = words.iter().position(|w| w == "--");
        let params = &words[..at.unwrap_or(words.len())];
        let value = |key: &str| -> Vec<&str> {
            params
                .iter()
                .filter_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .collect()
        };
        let mut bad = Vec::new();
        let shares = value(SHARE)
            .into_iter()
            .filter_map(|spec| {
                let mut parts = spec.splitn(3, ',');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(tag), Some(path), mode) if !tag.is_empty() && !path.is_empty() => {
                        Some(Share {
                            tag: tag.into(),
                            guest_path: path.into(),
                            read_only: mode == Some("ro"),
                        })
                    }
                    _ => {
                        bad.push(format!("{SHARE}={spec}"));
                        None
                    }
                }
            })
            .collect();
        let root = value(ROOT).into_iter().filter_map(|spec| {
            let mut parts = spec.split(',');
            let mut lower: Vec<String> = parts
                .next()
                .unwrap_or_default()
                .split(':')
                .map(str::to_string)
                .collect();
            let image = lower.pop().unwrap_or_default();
            let layer = parts.next().map(str::to_string);
            let all_ok = lower
                .iter()
                .chain([&image])
                .chain(&layer)
                .all(|s| check_serial(s).is_ok());
            if !all_ok || parts.next().is_some() {
                bad.push(format!("{ROOT}={spec}"));
                return None;
            }
            Some(Root {
                saved: lower,
                image,
                layer,
            })
        });
        let root = root.last();
        let boot = Boot {
            session: params.iter().any(|w| w == SESSION),
            shares,
            workdir: value(WORKDIR).pop().map(str::to_string),
            root,
            egress_ca: value(EGRESS_CA).pop().map(str::to_string),
            mcp: params.iter().any(|w| w == MCP),
            command: at.map(|i| words[i + 1..].to_vec()),
        };
        (boot, bad)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_round_trips() {
        let boot = Boot {
            session: true,
            shares: vec![
                Share {
                    tag: "sbx0".into(),
                    guest_path: "/workspace".into(),
                    read_only: false,
                },
                Share {
                    tag: "sbx1".into(),
                    guest_path: "/ref".into(),
                    read_only: true,
                },
            ],
            workdir: Some("/workspace".into()),
            root: Some(Root {
                saved: vec!["sbx-saved0".into(), "sbx-saved1".into()],
                image: "sbx-image".into(),
                layer: Some("sbx-layer".into()),
            }),
            egress_ca: Some("QUJD".into()),
            mcp: true,
            command: None,
        };
        let line = boot.encode(BASE, &["noxsave"]).unwrap();
        assert_eq!(
            line,
            "console=ttyS0 reboot=k panic=-1 quiet tsc=reliable noxsave sbx.session \
             sbx.fs=sbx0,/workspace,rw sbx.fs=sbx1,/ref,ro sbx.workdir=/workspace \
             sbx.root=sbx-saved0:sbx-saved1:sbx-image,sbx-layer sbx.egress=QUJD sbx.mcp"
        );
        assert_eq!(Boot::parse(&line), (boot, Vec::new()));
    }

    #[test]
    fn the_command_follows_double_dash() {
        let boot = Boot {
            command: Some(vec!["sh".into(), "-c".into(), "echo hi".into(), "".into()]),
            ..Boot::default()
        };
        let line = boot.encode("console=ttyS0", &[]).unwrap();
        assert!(line.ends_with(" -- sh -c \"echo hi\" \"\""), "{line}");
        assert_eq!(Boot::parse(&line).0, boot);
        // Parameters after `--` belong to the command.
        let (b, _) = Boot::parse("quiet -- sbx.session sbx.fs=a,/b,rw");
        assert!(!b.session && b.shares.is_empty());
        assert_eq!(Boot::parse("console=ttyS0 quiet").0.command, None);
        assert_eq!(Boot::parse("a -- ").0.command, Some(Vec::new()));
        // A base that already holds an extra word does not get it twice.
        let line = Boot::default().encode("x noxsave", &["noxsave"]).unwrap();
        assert_eq!(line, "x noxsave");
    }

    #[test]
    fn what_the_line_cannot_carry_is_refused() {
        let quoted = Boot {
            command: Some(vec!["a\"b".into()]),
            ..Boot::default()
        };
        assert!(matches!(
            quoted.encode("x", &[]),
            Err(CmdlineError::Quote(_))
        ));
        let spaced = Boot {
            shares: vec![Share {
                tag: "t".into(),
                guest_path: "/with space".into(),
                read_only: true,
            }],
            ..Boot::default()
        };
        assert!(spaced.encode("x", &[]).is_err());
        let (b, bad) = Boot::parse("sbx.fs=onlytag sbx.fs=t,/ok,ro");
        assert_eq!(bad, ["sbx.fs=onlytag"]);
        assert_eq!(b.shares.len(), 1);
        let (b, bad) = Boot::parse("sbx.root=a/b sbx.root=a,b,c sbx.root=:a sbx.root=a::b");
        assert_eq!(
            bad,
            [
                "sbx.root=a/b",
                "sbx.root=a,b,c",
                "sbx.root=:a",
                "sbx.root=a::b"
            ]
        );
        assert_eq!(b.root, None);
        assert_eq!(
            Boot::parse("sbx.root=img").0.root,
            Some(Root {
                saved: Vec::new(),
                image: "img".into(),
                layer: None
            })
        );
        let long = Boot {
            root: Some(Root {
                saved: Vec::new(),
                image: "x".repeat(21),
                layer: None,
            }),
            ..Boot::default()
        };
        assert!(matches!(
            long.encode("x", &[]),
            Err(CmdlineError::Serial(_))
        ));
    }
}
