//! `sbx audit verify`, `sbx audit ship` and `sbx events`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use sbx_audit::{printable, Filter, Record};

use sandbox::paths;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check audit logs' hash chains; names the first record that was
    /// edited, deleted or moved. Exits 0 if intact, 1 if not.
    Verify {
        /// Logs to check (default: every session's log).
        files: Vec<PathBuf>,
    },
    /// Send the sessions' records to the sbx server this machine is signed
    /// in to, from where the server's copy stands (sessions ship their own
    /// while they run; this sends what a killed session or an offline
    /// spell left). Exits 0 when all were sent, 1 if some could not be.
    Ship {
        /// Logs to ship (default: every session's log).
        files: Vec<PathBuf>,
        /// Send every record again: the server drops what it holds and
        /// flags any record that differs from its copy.
        #[arg(long)]
        all: bool,
    },
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    match args.cmd {
        Cmd::Verify { files } => verify(files),
        Cmd::Ship { files, all } => ship(files, all),
    }
}

fn ship(files: Vec<PathBuf>, all: bool) -> anyhow::Result<u8> {
    if sandbox::managed::current()?.is_none() {
        bail!("not signed in to an sbx server: `sbx login URL` first");
    }
    let files = if files.is_empty() {
        session_logs()?
    } else {
        files
    };
    let mut failed = false;
    for f in files {
        match sandbox::managed::ship(&f, all) {
            Ok(s) => println!(
                "{}: {} sent, {} new, {} already held, {} flagged",
                f.display(),
                s.sent,
                s.accepted,
                s.duplicates,
                s.flagged
            ),
            Err(e) => {
                failed = true;
                eprintln!("sbx: {}: {e}", f.display());
            }
        }
    }
    Ok(u8::from(failed))
}

fn session_logs() -> anyhow::Result<Vec<PathBuf>> {
    Ok(paths::session_logs()?)
}

fn verify(files: Vec<PathBuf>) -> anyhow::Result<u8> {
    let files = if files.is_empty() {
        session_logs()?
    } else {
        files
    };
    if files.is_empty() {
        bail!(
            "no audit logs in {}; name one to check",
            paths::audit_dir().display()
        );
    }
    let mut bad = 0;
    for f in &files {
        match sbx_audit::verify(f)? {
            Ok(v) => println!(
                "ok      {}: {} records, head {}",
                f.display(),
                v.records,
                &v.head[..16]
            ),
            Err(p) => {
                bad += 1;
                println!("TAMPERED {}: {p}", f.display());
            }
        }
    }
    Ok(if bad == 0 { 0 } else { 1 })
}

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx events                           every session's events
  sbx events s1 --decision deny        what policy refused in session s1
  sbx events --surface net --since 10m
  sbx events s1 --follow --json")]
pub struct EventsArgs {
    /// Session whose events to print (default: all sessions).
    session: Option<String>,
    /// Only this surface: fs, net, credential, mcp, exec, limits.
    #[arg(long)]
    surface: Option<String>,
    /// Only this outcome: allow, deny, audit-deny.
    #[arg(long)]
    decision: Option<String>,
    /// Only this kind of record: decision, guest, session.
    #[arg(long)]
    category: Option<String>,
    /// Only records at or after this time (RFC 3339, or a duration ago: 10m, 2h).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Only records at or before this time.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Keep printing records as they are written.
    #[arg(long, short)]
    follow: bool,
    /// Print records as JSON lines, as stored.
    #[arg(long)]
    json: bool,
    /// Read this log file instead of the session logs.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
}

fn print(out: &mut impl Write, r: &Record, json: bool) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
    }
    // Every field may hold text the guest chose (a file name, a command
    // line): shown to a person, it is escaped; JSON keeps it exact.
    let e = &r.event;
    let rule = match (&e.rule_id, &e.layer) {
        (Some(id), Some(layer)) => format!("{id} ({layer})"),
        _ => String::new(),
    };
    writeln!(
        out,
        "{}  {:<12} {:<8} {:<10} {:<10} {:<8} {}  {}  {}",
        printable(&r.ts),
        printable(&r.session),
        r.category.as_str(),
        printable(e.surface.as_deref().unwrap_or("-")),
        printable(e.decision.as_deref().unwrap_or("-")),
        printable(&e.action),
        printable(&e.resource),
        printable(&rule),
        printable(e.reason.as_deref().unwrap_or(""))
    )
}

pub fn events(a: EventsArgs) -> anyhow::Result<u8> {
    let now = time::OffsetDateTime::now_utc();
    let when = |s: &Option<String>| -> anyhow::Result<Option<time::OffsetDateTime>> {
        s.as_deref()
            .map(|t| {
                sbx_audit::parse_time(t, now)
                    .with_context(|| format!("`{t}` is not a time: use RFC 3339 (2026-11-21T10:00:00Z) or a duration ago (10m, 2h)"))
            })
            .transpose()
    };
    let filter = Filter {
        session: None,
        surface: a.surface.clone(),
        decision: a.decision.clone(),
        category: a.category.clone(),
        since: when(&a.since)?,
        until: when(&a.until)?,
    };
    let logs = match (&a.file, &a.session) {
        (Some(f), _) => vec![f.clone()],
        (None, Some(s)) => {
            let f = paths::audit_dir().join(format!("{s}.jsonl"));
            if !f.exists() {
                bail!("no session named `{s}` (no audit log at {}); `sbx events` lists every session's events", f.display());
            }
            vec![f]
        }
        (None, None) => session_logs()?,
    };
    let mut cursors = vec![sbx_audit::Cursor::default(); logs.len()];
    let mut out = std::io::stdout().lock();
    loop {
        let mut batch = Vec::new();
        for (log, cursor) in logs.iter().zip(cursors.iter_mut()) {
            let records = sbx_audit::read_records(log, cursor)?;
            batch.extend(records.into_iter().filter(|r| filter.matches(r)));
        }
        batch.sort_by(|a, b| a.ts.cmp(&b.ts));
        for r in &batch {
            print(&mut out, r, a.json)?;
        }
        out.flush()?;
        if !a.follow {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
