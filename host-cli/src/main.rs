//! sbx: microVM sandboxes for AI agents.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

mod audit_cmd;
mod boot;
mod doctor;
mod image_cmd;
mod login_cmd;
mod mcp_cmd;
mod policy_cmd;
mod secret_cmd;
mod session;
mod template_cmd;

use sandbox::EXIT_SBX_ERROR;

#[derive(Parser)]
#[command(
    name = "sbx",
    version,
    about = "Run AI agents in microVM sandboxes",
    long_about = "sbx gives every agent session its own microVM, booted by sbx's own VMM on KVM, \
and governs everything that crosses the VM boundary.\n\n\
Start with `sbx doctor` to see whether this host can run sandboxes, then \
`sbx run -- uname -a` to run one command in a fresh sandbox, or:\n\n  \
sbx start --name s1      boot a session in the background\n  \
sbx exec s1 -- make      run commands in it (stdin, stdout, exit status pass through)\n  \
sbx shell s1             an interactive shell\n  \
sbx events s1            what happened in it, and what the policy decided\n  \
sbx stop s1 && sbx rm s1"
)]
struct Cli {
    /// Log verbosity for sbx itself (error, warn, info, debug, trace); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check what this host can do and say what to fix.
    Doctor(doctor::Args),
    /// Start a session (a sandbox VM) in the background.
    Start(session::StartArgs),
    /// Run a command in a running session.
    Exec(session::ExecArgs),
    /// Open an interactive shell in a running session.
    Shell(session::ShellArgs),
    /// List sessions: name, state, uptime, vCPUs, memory.
    Ls(session::LsArgs),
    /// Stop a session: gracefully, then forcibly after a timeout.
    Stop(session::StopArgs),
    /// Remove stopped or dead sessions' state.
    Rm(session::RmArgs),
    /// Pause a running session: its vCPUs stop (no host CPU), its memory,
    /// processes and connections are kept.
    Pause(session::PauseArgs),
    /// Resume a paused session.
    Resume(session::PauseArgs),
    /// Bring a clone workspace's branches (--workspace clone) to the host repository.
    Fetch(session::FetchArgs),
    /// Run one command in a fresh session that is removed afterwards.
    Run(session::RunArgs),
    /// Pull, import, list and remove the images sessions boot from.
    Image(image_cmd::Args),
    /// Agent templates: list, show, build (claude-code, codex, gemini, shell).
    Template(template_cmd::Args),
    /// Boot a guest kernel directly and run one command in it (low level).
    Boot(boot::Args),
    /// Check, explain and show policy; sign organisation bundles.
    Policy(policy_cmd::Args),
    /// Sign this machine in to an sbx server (its org and team policy apply from then on).
    Login(login_cmd::LoginArgs),
    /// Sign this machine out of its sbx server.
    Logout,
    /// A session's MCP gateway: servers, tools and their pins, approve, call.
    Mcp(mcp_cmd::Args),
    /// Store the secrets the egress proxy injects (the guest never sees them).
    Secret(secret_cmd::Args),
    /// Verify audit logs.
    Audit(audit_cmd::Args),
    /// Print sessions' events and policy decisions from their audit logs.
    Events(audit_cmd::EventsArgs),
    /// The session process itself (started by `sbx start`).
    #[command(name = "__session", hide = true)]
    Session(session::ServeArgs),
    /// Starts a session's stdio MCP servers' VMs (started by the session).
    #[command(name = "__mcp-servers", hide = true)]
    McpServers { agent: String },
}

fn main() -> ExitCode {
    let start = Instant::now();
    // Like other CLI tools, end quietly when a reader closes the pipe (`sbx doctor | head`).
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Doctor(args) => doctor::run(args),
        Command::Start(args) => session::start(args),
        Command::Exec(args) => session::exec(args),
        Command::Shell(args) => session::shell(args),
        Command::Ls(args) => session::ls(args),
        Command::Stop(args) => session::stop(args),
        Command::Rm(args) => session::rm(args),
        Command::Pause(args) => session::pause(args, true),
        Command::Resume(args) => session::pause(args, false),
        Command::Run(args) => session::run(args),
        Command::Fetch(args) => session::fetch(args),
        Command::Session(args) => session::serve(args),
        Command::Boot(args) => boot::run(args, start),
        Command::Image(args) => image_cmd::run(args),
        Command::Template(args) => template_cmd::run(args),
        Command::Policy(args) => policy_cmd::run(args),
        Command::Mcp(args) => mcp_cmd::run(args),
        Command::Login(args) => login_cmd::login(args),
        Command::Logout => login_cmd::logout(),
        Command::McpServers { agent } => sandbox::mcp::helper_main(&agent)
            .map(|()| 0)
            .map_err(Into::into),
        Command::Secret(args) => secret_cmd::run(args),
        Command::Audit(args) => audit_cmd::run(args),
        Command::Events(args) => audit_cmd::events(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let message = in_flag_terms(&e).unwrap_or_else(|| format!("{e:#}"));
            eprintln!("sbx: {message}");
            ExitCode::from(EXIT_SBX_ERROR)
        }
    }
}

/// The libraries say what is wrong with a value; the CLI says which flag
/// set it, so that the user knows what to change.
fn in_flag_terms(e: &anyhow::Error) -> Option<String> {
    use vmm::boot::BootError;
    use vmm::machine::{MAX_MEM_MIB, MIN_MEM_MIB};
    use vmm::VmmError;
    let Some(sandbox::Error::Vmm(v)) = e.downcast_ref::<sandbox::Error>() else {
        return None;
    };
    Some(match v {
        VmmError::VcpuCount { requested, max } => {
            format!("--vcpus {requested} is out of range: this host allows 1 to {max}")
        }
        VmmError::MemRange(mib) => {
            format!("--mem {mib} MiB is out of range ({MIN_MEM_MIB} to {MAX_MEM_MIB} MiB)")
        }
        VmmError::Boot(BootError::MemoryTooSmall {
            mem_mib,
            need_mib,
            what,
        }) => format!(
            "guest memory of {mem_mib} MiB is too small: the kernel{what} needs at least {need_mib} MiB; raise --mem"
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        // Catches clashing flags (such as a subcommand's `--log` against the
        // global one) at test time rather than as a panic in a user's hands.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
