//! `sbx login` and `sbx logout`: this machine's link to a control plane
//! (`sbx-server`), whose org and team policy every session start then
//! fetches (see `sandbox::managed`).

use anyhow::Context;
use sandbox::managed::{self, Refresh};

#[derive(clap::Args)]
#[command(
    after_help = "Signing in shows a code; a person approves it at the address shown \
(or with POST /api/v1/device/approve), and this machine then acts as them. From then on every \
`sbx start`, `sbx run` and `sbx policy` fetches the org and team policy (cheaply: a conditional \
request), checked against the organisation's key pinned now. Without the server, the last policy \
serves until it expires; then sessions refuse to start. `sbx logout` undoes all of it."
)]
pub struct LoginArgs {
    /// The server, e.g. https://sbx.example.com (none: show the current sign-in).
    url: Option<String>,
    /// This machine's name on the server (default: the host name).
    #[arg(long)]
    machine: Option<String>,
}

pub fn login(a: LoginArgs) -> anyhow::Result<u8> {
    let Some(url) = a.url else {
        match managed::current()? {
            Some(l) => println!(
                "signed in to {} as {} ({}{}) from machine {}",
                l.url,
                l.email,
                l.role,
                l.team.map(|t| format!(", team {t}")).unwrap_or_default(),
                l.machine
            ),
            None => {
                println!("not signed in: `sbx login URL` signs this machine in to an sbx server")
            }
        }
        return Ok(0);
    };
    let machine = match a.machine {
        Some(m) => m,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("cannot read the host name: give --machine")?,
    };
    let l = managed::login(&url, &machine, |code, uri| {
        eprintln!("To sign this machine in, approve the code {code} at {uri}");
        eprintln!("(waiting for the approval...)");
    })?;
    println!(
        "signed in to {} as {} ({}{}); the organisation's key is pinned",
        l.url,
        l.email,
        l.role,
        l.team.map(|t| format!(", team {t}")).unwrap_or_default()
    );
    report(managed::refresh()?);
    Ok(0)
}

pub fn logout() -> anyhow::Result<u8> {
    match managed::logout()? {
        None => println!("not signed in"),
        Some(true) => println!("signed out; the server revoked this machine's token"),
        Some(false) => println!(
            "signed out here; the server could not be told: revoke this machine's token there"
        ),
    }
    Ok(0)
}

/// Says what a refresh of the managed policy did, when it matters.
pub fn report(r: Refresh) {
    match r {
        Refresh::Updated(names) => eprintln!("sbx: managed policy updated: {}", names.join(", ")),
        Refresh::Offline(why) => {
            eprintln!("sbx: warning: {why}; using the policy fetched last, until it expires")
        }
        Refresh::NotManaged | Refresh::Unchanged => {}
    }
}

/// Refreshes the managed policy once per process, before policy is loaded
/// from the places sbx finds it.
pub fn refresh_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| match managed::refresh() {
        Ok(r) => report(r),
        Err(e) => eprintln!("sbx: warning: cannot refresh the managed policy: {e}"),
    });
}
