//! sbx guest agent: PID 1 of the microVM.
//!
//! It mounts the pseudo filesystems and reports that it started through the
//! debug port. With `sbx.session` on the kernel command line (see
//! `sbx_protocol::cmdline`) it then serves
//! the host over vsock (see `session`). Otherwise it runs the command given
//! after `--` (a shell on the console when there is none), reaps every
//! process, syncs, and reports the command's exit status, which ends the VM.

mod bridge;
mod egress;
mod events;
mod exec;
mod init;
mod mcp;
mod reaper;
mod refresh;
mod relay;
mod report;
mod root;
mod run;
mod session;
mod vsock;

fn main() {
    // The same binary is the stdio bridge to the MCP gateway (see `mcp`).
    let argv0 = std::env::args().next().unwrap_or_default();
    if argv0.ends_with("sbx-mcp-bridge") {
        std::process::exit(bridge::main());
    }
    let is_init = std::process::id() == 1;
    if is_init {
        init::mount_pseudo_filesystems();
        init::set_hostname(init::HOSTNAME);
    }
    report::send(sbx_protocol::debug_port::Report::AgentStarted);

    // No `--` on the kernel command line means an interactive shell; argv is
    // only a fallback for running outside a VM (it also holds stray kernel
    // parameters such as `noxsave`).
    let line = std::fs::read_to_string("/proc/cmdline").ok();
    let boot = line.as_deref().map(|l| {
        let (boot, malformed) = sbx_protocol::cmdline::Boot::parse(l);
        for word in malformed {
            eprintln!("sbx-guest-agent: ignoring malformed {word}");
        }
        boot
    });
    if let Some(b) = &boot {
        if let (true, Some(root)) = (is_init, &b.root) {
            // Asked for an image, a session in the initramfs would be a
            // different machine than asked for: stop instead.
            if let Err(e) = root::switch(root) {
                eprintln!("sbx-guest-agent: cannot make the image the root: {e}");
                init::drain_console();
                init::reboot();
            }
        }
        if is_init {
            init::mount_shares(&b.shares);
        }
        exec::set_default_cwd(b.workdir.clone());
        let mut env = Vec::new();
        if egress::start(b.egress_ca.clone()) {
            env.extend(sbx_protocol::egress::environment());
        }
        if mcp::start(b.mcp) {
            env.extend(sbx_protocol::mcp::environment());
        }
        exec::set_default_env(env);
        if b.session {
            session::serve();
        }
    }
    let argv: Vec<String> = match boot {
        Some(b) => b.command.unwrap_or_default(),
        None => std::env::args().skip(1).collect(),
    };
    let code = run::run(&argv);

    if is_init {
        init::sync();
        init::drain_console();
    }
    // The VMM ends the VM on this report; rebooting is the fallback.
    report::send(sbx_protocol::debug_port::Report::ExitStatus(code));
    if is_init {
        init::reboot();
    }
    std::process::exit(i32::from(code));
}
