//! `sbx secret`: the values the egress proxy injects, kept on the host and
//! encrypted at rest (the store is `sandbox::secrets`).

use std::io::{IsTerminal, Read, Write};

use anyhow::{bail, Context};
use sandbox::secrets::{check_name, Store};

#[derive(clap::Args)]
#[command(after_help = "\
The guest never sees a secret. A [[credential]] rule in the policy names the
secret, the hosts it may go to and how (a header, or swapping the
placeholder the guest holds); the egress proxy does that on the host.

Examples:
  printf %s \"$GITHUB_TOKEN\" | sbx secret set GITHUB_TOKEN
  sbx secret set NPM_TOKEN            (type it; nothing is echoed)
  sbx secret ls
  sbx secret rm NPM_TOKEN")]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Store a secret, read from stdin (one trailing newline is dropped).
    Set {
        /// Letters, digits and `_`, as the policy's `secret =` names it.
        name: String,
    },
    /// List stored secrets' names (never their values).
    Ls,
    /// Delete a stored secret.
    Rm { name: String },
}

/// Reads the value from stdin; from a terminal, without echo.
fn read_value(name: &str) -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    let mut value = Vec::new();
    if stdin.is_terminal() {
        eprint!("value for {name} (not echoed, then Enter): ");
        let _ = std::io::stderr().flush();
        let echo = sandbox::terminal::RawMode::echo_off(0);
        let mut line = String::new();
        stdin
            .read_line(&mut line)
            .context("cannot read the value")?;
        drop(echo);
        eprintln!();
        value = line.into_bytes();
    } else {
        stdin
            .lock()
            .read_to_end(&mut value)
            .context("cannot read the value from stdin")?;
    }
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    if value.is_empty() {
        bail!("the value of {name} is empty; pipe it in, e.g. printf %s \"$TOKEN\" | sbx secret set {name}");
    }
    Ok(value)
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let store = Store::open();
    match args.command {
        Cmd::Set { name } => {
            check_name(&name)?;
            let value = read_value(&name)?;
            store.set(&name, &value)?;
            eprintln!("stored secret {name}; a [[credential]] rule decides where it may go");
        }
        Cmd::Ls => {
            for n in store.names()? {
                println!("{n}");
            }
        }
        Cmd::Rm { name } => {
            if !store.remove(&name)? {
                bail!("no secret named {name}; `sbx secret ls` lists them");
            }
        }
    }
    Ok(0)
}
