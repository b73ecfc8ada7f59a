//! How guest programs reach the MCP gateway: a relay on the guest's
//! loopback carries each connection over vsock to the host, where the
//! gateway decides every request. Nothing in the guest can reach an MCP
//! server any other way.

/// The host serves the gateway on this vsock port.
pub const HOST_PORT: u32 = 1027;
/// The guest agent's relay listens on 127.0.0.1 at this port.
pub const GUEST_PORT: u16 = 7331;
/// The stdio bridge for agents that only start stdio servers: the guest
/// agent's own binary, which runs as the bridge under this name.
pub const BRIDGE: &str = "/run/sbx/bin/sbx-mcp-bridge";
/// The name the agents' configuration gives the gateway.
pub const SERVER_NAME: &str = "sbx";

/// The gateway's Streamable HTTP endpoint, as guest programs reach it.
pub fn url() -> String {
    format!("http://127.0.0.1:{GUEST_PORT}/mcp")
}

/// The environment every guest process gets when the session has MCP
/// servers.
pub fn environment() -> Vec<(&'static str, String)> {
    vec![("SBX_MCP_URL", url())]
}
