//! Host edits to shared directories, passed on to the guest agent. Under
//! `--fs-cache auto` the guest keeps what it cached of a share for a
//! minute; the VMM reports each host edit (see the virtio-fs device's
//! `host_watch`) and the agent revalidates those paths.

use std::io::Read;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use sbx_protocol::agent::{write_frame, Control, Frame, AGENT_PORT};
use vmm::devices::virtio::fs::HostChanges;
use vmm::devices::virtio::vsock::VsockHost;

/// Starts the thread that forwards batches to the guest agent, one at a
/// time and in order; the sender is where the devices' reports go.
pub fn start(host: VsockHost) -> std::io::Result<Sender<HostChanges>> {
    let (tx, rx) = channel();
    sbx_seccomp::spawn("host-edits", sbx_seccomp::Kind::HostEdits, move || {
        forward(&host, &rx)
    })?;
    Ok(tx)
}

/// Path bytes per message, well inside the protocol's frame limit.
const MESSAGE_BYTES: usize = 256 * 1024;

fn forward(host: &VsockHost, batches: &Receiver<HostChanges>) {
    while let Ok(mut batch) = batches.recv() {
        // Batches that queued while the last one was applied go as one.
        while let Ok(more) = batches.try_recv() {
            batch.paths.extend(more.paths);
            batch.trees.extend(more.trees);
        }
        batch.trees.sort();
        batch.trees.dedup();
        let paths: std::collections::BTreeSet<String> = batch.paths.into_iter().collect();
        let mut message = Vec::new();
        let mut bytes = 0;
        for p in paths {
            if bytes + p.len() > MESSAGE_BYTES {
                send(host, std::mem::take(&mut message), Vec::new());
                bytes = 0;
            }
            bytes += p.len();
            message.push(p);
        }
        send(host, message, batch.trees);
    }
}

/// One refresh, waited for: the agent closes once it has revalidated
/// everything. Before the agent listens nothing is cached worth keeping
/// fresh; a failure only means the edits show once the cache times out.
fn send(host: &VsockHost, paths: Vec<String>, trees: Vec<String>) {
    if paths.is_empty() && trees.is_empty() {
        return;
    }
    match host.connect(AGENT_PORT, Duration::from_secs(2)) {
        Ok(mut agent) => {
            let refresh = Frame::Control(Control::Refresh { paths, trees });
            if write_frame(&mut agent, &refresh).is_ok() {
                let _ = agent.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = agent.read(&mut [0u8; 64]);
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot pass host edits to the guest agent"),
    }
}
