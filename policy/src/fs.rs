//! File rules: the mounts that grant access, and deny globs that carve
//! paths out of them.

use std::path::{Path, PathBuf};

use globset::{Candidate, Glob, GlobSet, GlobSetBuilder};
use toml::Spanned;

use crate::compile::Ctx;
use crate::format::{RawFsRule, RawMount};
use crate::rule::{Action, RuleIdx, Surface};
use crate::PolicyError;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// A host directory shared into the guest.
#[derive(Clone, Debug)]
pub struct Mount {
    pub host: PathBuf,
    /// Absolute, normalised guest path.
    pub guest: String,
    pub read_only: bool,
    pub(crate) rule: RuleIdx,
}

struct FsDeny {
    rule: RuleIdx,
    read: bool,
    write: bool,
    /// Denies creating symlinks that leave their share (and nothing else).
    leaving_links: bool,
}

/// What a file rule is asked about.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum FsAct {
    Access(Access),
    /// Creating a symlink whose target leaves its share.
    LeavingLink,
}

/// Deny globs of one kind compiled into one set, since every file the guest
/// touches is checked against all of them: one pass per path, not one
/// regex per glob.
#[derive(Default)]
struct DenyGlobs {
    globs: Vec<Glob>,
    /// The deny (index into `FsRules::denies`) each glob belongs to.
    owner: Vec<usize>,
    set: GlobSet,
}

impl DenyGlobs {
    fn seal(&mut self) -> Result<(), globset::Error> {
        let mut b = GlobSetBuilder::new();
        for g in &self.globs {
            b.add(g.clone());
        }
        self.set = b.build()?;
        Ok(())
    }

    /// Marks in `hit` each deny with a glob matching one of `paths`.
    fn mark(&self, paths: &[&str], hit: &mut [bool], found: &mut Vec<usize>) {
        for p in paths {
            self.set.matches_candidate_into(&Candidate::new(p), found);
            for &g in found.iter() {
                hit[self.owner[g]] = true;
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct FsRules {
    pub(crate) mounts: Vec<Mount>,
    denies: Vec<FsDeny>,
    /// Globs starting with `/` match guest paths.
    absolute: DenyGlobs,
    /// The others match paths relative to the mount.
    relative: DenyGlobs,
}

/// Resolves `.` and `..` without touching the disk. `..` above the root
/// stays at the root, as the kernel does.
pub fn normalize_guest_path(path: &str) -> Option<String> {
    if !path.starts_with('/') || path.contains('\0') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

fn under<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    if root == "/" {
        return Some(path.trim_start_matches('/'));
    }
    let rest = path.strip_prefix(root)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('/')
    }
}

/// `s` and each of its ancestors, as slices of it, shortest first:
/// `a/b/c` gives `a`, `a/b`, `a/b/c`; `/w/a` gives `/w`, `/w/a`.
fn ancestors(s: &str) -> Vec<&str> {
    s.match_indices('/')
        .map(|(i, _)| &s[..i])
        .chain(std::iter::once(s))
        .filter(|p| !p.is_empty())
        .collect()
}

const RESERVED: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// Why `guest` cannot be a mount point, if it cannot.
pub(crate) fn bad_mount_point(guest: &str) -> Option<String> {
    (guest == "/" || RESERVED.iter().any(|r| under(guest, r).is_some())).then(|| {
        format!(
            "cannot mount over `{guest}`: /, /proc, /sys, /dev and /run belong to the guest system"
        )
    })
}

fn host_path(ctx: &Ctx, raw: &Spanned<String>) -> Result<PathBuf, PolicyError> {
    let s = raw.get_ref();
    if s.is_empty() || s.contains('\0') {
        return Err(ctx.err(raw.span().start, "the host path is empty"));
    }
    let p = if let Some(rest) = s.strip_prefix("~/") {
        let home = std::env::var_os("HOME")
            .ok_or_else(|| ctx.err(raw.span().start, "`~` needs $HOME, which is not set"))?;
        Path::new(&home).join(rest)
    } else if Path::new(s).is_absolute() {
        PathBuf::from(s)
    } else {
        // Relative to the policy file, so that a project policy can say ".".
        let base = Path::new(&*ctx.src.name).parent().unwrap_or(Path::new(""));
        base.join(s)
    };
    Ok(p)
}

impl FsRules {
    pub(crate) fn add_mount(
        &mut self,
        ctx: &mut Ctx,
        raw: &Spanned<RawMount>,
    ) -> Result<(), PolicyError> {
        let m = raw.get_ref();
        let host = host_path(ctx, &m.host)?;
        let guest = normalize_guest_path(m.guest.get_ref())
            .ok_or_else(|| ctx.err(m.guest.span().start, "the guest path must be absolute"))?;
        if let Some(why) = bad_mount_point(&guest) {
            return Err(ctx.err(m.guest.span().start, why));
        }
        let read_only = match m
            .mode
            .as_ref()
            .map(|s| (s.get_ref().as_str(), s.span().start))
        {
            None | Some(("ro", _)) => true,
            Some(("rw", _)) => false,
            Some((other, at)) => {
                return Err(ctx.err(at, format!("mount mode `{other}` is not \"ro\" or \"rw\"")))
            }
        };
        let summary = format!(
            "mount {} at {guest} {}",
            host.display(),
            if read_only { "read-only" } else { "read-write" }
        );
        let rule = ctx.table_rule(Surface::Fs, raw, Action::Allow, summary)?;
        if let Some(prev) = self.mounts.iter_mut().find(|p| p.guest == guest) {
            if prev.host != host {
                let senior = &ctx.rules[prev.rule as usize];
                return Err(ctx.err(
                    m.host.span().start,
                    format!(
                        "{guest} is already mounted from {} by {} ({} layer); one guest path has one host directory",
                        prev.host.display(),
                        senior.location,
                        senior.layer
                    ),
                ));
            }
            // The same mount twice: read-only wins, the senior rule stays.
            prev.read_only |= read_only;
            return Ok(());
        }
        self.mounts.push(Mount {
            host,
            guest,
            read_only,
            rule,
        });
        Ok(())
    }

    pub(crate) fn add_rule(
        &mut self,
        ctx: &mut Ctx,
        raw: &Spanned<RawFsRule>,
    ) -> Result<(), PolicyError> {
        let r = raw.get_ref();
        let action = ctx.action(&r.action)?;
        if action == Action::Allow {
            return Err(ctx.err(
                r.action.span().start,
                "file rules only deny; grant access with a [[mount]]",
            ));
        }
        ctx.non_empty(&r.paths, raw.span().start, "paths")?;
        let leaving_links =
            match &r.links {
                None => false,
                Some(l) if l.get_ref() == "leaving" && r.access.is_none() => true,
                Some(l) if l.get_ref() == "leaving" => return Err(ctx.err(
                    l.span().start,
                    "a `links` rule denies creating links, not reading or writing: drop `access`",
                )),
                Some(l) => {
                    return Err(ctx.err(
                        l.span().start,
                        format!(
                        "links `{}` is not \"leaving\" (symlinks whose target leaves their share)",
                        l.get_ref()
                    ),
                    ))
                }
            };
        let (read, write) = match r
            .access
            .as_ref()
            .map(|a| (a.get_ref().as_str(), a.span().start))
        {
            _ if leaving_links => (false, false),
            None | Some(("read-write", _)) => (true, true),
            Some(("read", _)) => (true, false),
            Some(("write", _)) => (false, true),
            Some((other, at)) => {
                return Err(ctx.err(
                    at,
                    format!("access `{other}` is not \"read\", \"write\" or \"read-write\""),
                ))
            }
        };
        let mut globs = Vec::new();
        for p in &r.paths {
            globs.push((p.get_ref().starts_with('/'), ctx.glob_pattern(p)?));
        }
        let what = match (read, write) {
            _ if leaving_links => "symlinks leaving their share at",
            (true, true) => "read and write of",
            (true, false) => "read of",
            _ => "write of",
        };
        let list: Vec<&str> = r.paths.iter().map(|p| p.get_ref().as_str()).collect();
        let summary = format!("deny {what} {}", list.join(", "));
        let rule = ctx.table_rule(Surface::Fs, raw, action, summary)?;
        let deny = self.denies.len();
        self.denies.push(FsDeny {
            rule,
            read,
            write,
            leaving_links,
        });
        for (absolute, glob) in globs {
            let set = if absolute {
                &mut self.absolute
            } else {
                &mut self.relative
            };
            set.globs.push(glob);
            set.owner.push(deny);
        }
        Ok(())
    }

    /// Compiles the deny globs of every file (once all are added).
    pub(crate) fn seal(&mut self) -> Result<(), PolicyError> {
        for set in [&mut self.absolute, &mut self.relative] {
            set.seal().map_err(|e| {
                PolicyError::Conflict(format!(
                    "the file rules' {} deny globs do not compile together ({e}); use fewer or simpler `paths`",
                    set.globs.len()
                ))
            })?;
        }
        Ok(())
    }

    /// The mount that holds `path` (normalised), and the path inside it.
    pub(crate) fn mount_of<'a>(&self, path: &'a str) -> Option<(&Mount, &'a str)> {
        self.mounts
            .iter()
            .filter_map(|m| under(path, &m.guest).map(|rel| (m, rel)))
            .max_by_key(|(m, _)| m.guest.len())
    }

    /// Calls `seen` with every deny rule that covers `path` or one of its
    /// ancestors inside the mount (denying `.ssh` denies what is in it).
    pub(crate) fn visit_denies(
        &self,
        path: &str,
        rel: &str,
        act: FsAct,
        mut seen: impl FnMut(RuleIdx),
    ) {
        let mut hit = vec![false; self.denies.len()];
        let mut found = Vec::new();
        self.absolute.mark(&ancestors(path), &mut hit, &mut found);
        self.relative.mark(&ancestors(rel), &mut hit, &mut found);
        for (d, _) in self.denies.iter().zip(hit).filter(|(_, h)| *h) {
            let applies = match act {
                FsAct::Access(Access::Read) => d.read,
                FsAct::Access(Access::Write) => d.write,
                FsAct::LeavingLink => d.leaving_links,
            };
            if applies {
                seen(d.rule);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths() {
        assert_eq!(
            normalize_guest_path("/a/./b/../c//d/").as_deref(),
            Some("/a/c/d")
        );
        assert_eq!(normalize_guest_path("/../../etc").as_deref(), Some("/etc"));
        assert_eq!(normalize_guest_path("relative"), None);
        assert_eq!(under("/workspace/x", "/workspace"), Some("x"));
        assert_eq!(under("/workspace", "/workspace"), Some(""));
        assert_eq!(under("/workspacex", "/workspace"), None);
        assert_eq!(ancestors("a/.ssh/id"), ["a", "a/.ssh", "a/.ssh/id"]);
        assert_eq!(ancestors("/w/a"), ["/w", "/w/a"]);
        assert!(ancestors("").is_empty());
    }
}
