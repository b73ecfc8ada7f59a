//! The workspace in clone mode: the host's git repository is shared
//! read-only at [`ORIGIN`] and cloned onto the session's own disk at
//! `/workspace`, so metadata-heavy work (`git status`, `npm install`,
//! builds, `rm -rf`) runs at local-disk speed instead of asking the host
//! for every file. The session's commits come back with [`fetch`]: a git
//! bundle made in the guest, fetched into the host repository under
//! `refs/remotes/sbx/<session>/`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::attach;
use crate::error::{fail, At, Result};
use crate::spec::WORKSPACE;
use crate::state::Dir;

/// Where the host repository appears in the guest (read-only).
pub const ORIGIN: &str = "/mnt/sbx-origin";

/// The top of the git repository `dir` is in.
pub fn repository(dir: &Path) -> Result<PathBuf> {
    let out = Command::new("git")
        .args(["rev-parse", "--show-toplevel"])
        .current_dir(dir)
        .output()
        .at(|| "cannot run git (install git)".into())?;
    if !out.status.success() {
        fail!(
            Invalid,
            "--workspace clone: {} is not in a git repository; use the shared workspace, or `git init` first",
            dir.display()
        );
    }
    let top = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::canonicalize(&top).at(|| format!("cannot use the repository {top}"))
}

/// Clones the shared repository into `/workspace`, as the session's user
/// (`user`; None: root), unless a clone is there already (a restarted
/// session keeps its own).
pub fn clone_into(dir: &Dir, user: Option<&str>) -> Result<()> {
    // /workspace is made by root and given to whoever commands run as.
    let owner = user.unwrap_or("root").replace('\'', "");
    let prepare = format!(
        "test -d {WORKSPACE}/.git || {{ mkdir -p {WORKSPACE} && chown \"$(id -u '{owner}')\" {WORKSPACE}; }}"
    );
    if attach::script(dir, &prepare, Some("root"), 2)? != 0 {
        fail!(Session, "cannot prepare {WORKSPACE} for the clone");
    }
    let clone = format!(
        "test -d {WORKSPACE}/.git || git -c safe.directory='*' clone --quiet --no-hardlinks {ORIGIN} {WORKSPACE}"
    );
    if attach::script(dir, &clone, None, 2)? != 0 {
        fail!(
            Session,
            "cannot clone the repository into {WORKSPACE} (the guest needs git)"
        );
    }
    Ok(())
}

/// Fetches the session's branches into `repo` as
/// `refs/remotes/sbx/<session>/<branch>`; returns those refs.
pub fn fetch(dir: &Dir, repo: &Path) -> Result<Vec<String>> {
    let bundle = dir.path.join("workspace.bundle");
    let file =
        std::fs::File::create(&bundle).at(|| format!("cannot create {}", bundle.display()))?;
    let script = format!(
        "cd {WORKSPACE} && git -c safe.directory='*' bundle create - --branches --tags 2>/dev/null"
    );
    let status = attach::script(dir, &script, None, file.as_raw_fd())?;
    drop(file);
    if status != 0 {
        let _ = std::fs::remove_file(&bundle);
        fail!(
            Session,
            "session `{}` has no git repository at {WORKSPACE} with commits to fetch",
            dir.name
        );
    }
    let prefix = format!("refs/remotes/sbx/{}", dir.name);
    // The bundle is the guest's work: git checks every object it takes in.
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "fetch.fsckObjects=true",
            "-c",
            "transfer.fsckObjects=true",
        ])
        .args(["fetch", "--quiet", "--no-tags", "--force"])
        .arg(&bundle)
        .arg(format!("refs/heads/*:{prefix}/*"))
        .output()
        .at(|| "cannot run git fetch".into());
    let _ = std::fs::remove_file(&bundle);
    let out = out?;
    if !out.status.success() {
        fail!(
            Session,
            "git fetch of the session's bundle failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let refs = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["for-each-ref", "--format=%(refname:short)"])
        .arg(&prefix)
        .output()
        .at(|| "cannot run git for-each-ref".into())?;
    Ok(String::from_utf8_lossy(&refs.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}
