//! The API's routes, one file per concern, and its OpenAPI document.

use axum::Json;
use serde_json::{json, Value};

pub mod audit;
pub mod device;
pub mod identity;
pub mod policy;

/// `GET /api/v1/openapi.json`: what the API offers, for clients and people.
pub async fn openapi() -> Json<Value> {
    let bearer = json!([{ "bearer": [] }]);
    let op = |summary: &str, secured: bool| {
        let mut o = json!({ "summary": summary, "responses": { "200": { "description": "OK" },
            "400": { "description": "bad input: the body says what and where" },
            "401": { "description": "no, unknown or revoked token" },
            "403": { "description": "the caller's role may not" },
            "429": { "description": "too many requests from this token or address this minute" } } });
        if secured {
            o["security"] = bearer.clone();
        }
        o
    };
    Json(json!({
        "openapi": "3.1.0",
        "info": { "title": "sbx-server", "version": env!("CARGO_PKG_VERSION") },
        "components": { "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } } },
        "paths": {
            "/api/v1/setup": { "post": op("Make the first org admin with the setup token sbx-server printed", false) },
            "/api/v1/me": { "get": op("Who the token belongs to", true) },
            "/api/v1/teams": { "post": op("Create a team (org admins)", true), "get": op("List teams", true) },
            "/api/v1/users": { "post": op("Add a person with a role; returns their first token", true), "get": op("List people", true) },
            "/api/v1/tokens": { "get": op("List tokens (one's own; all for org admins)", true) },
            "/api/v1/tokens/{id}": { "delete": op("Revoke a token", true) },
            "/api/v1/device/code": { "post": op("Start signing a machine in: a device code and a user code", false) },
            "/api/v1/device/approve": { "post": op("Approve a user code as oneself", true) },
            "/api/v1/device/token": { "post": op("Poll for the machine token (once approved, once only)", false) },
            "/api/v1/policy": { "get": op("The caller's org and team policy as signed, expiring bundles (ETag, If-None-Match)", true) },
            "/api/v1/policy/org": { "put": op("Push a new org policy version (org admins; text/plain TOML)", true),
                                    "get": op("The org policy's versions (org admins, auditors)", true) },
            "/api/v1/policy/teams/{team}": { "put": op("Push a new team policy version (org admins, that team's admins)", true) },
            "/api/v1/audit": { "post": op("Ship a session's records, as JSON lines in order (machine tokens)", true),
                               "get": op("Records as JSON lines, filtered (user, team, machine, session, surface, decision, action, since, until), a page at a time (after, limit; X-Next-Cursor)", true) },
            "/api/v1/audit/heads": { "get": op("Where each of the machine's sessions stands on the server (machine tokens)", true) },
            "/api/v1/audit/flags": { "get": op("Edits, rewrites and gaps found in machines' logs (org admins, auditors)", true) },
            "/api/v1/alerts": { "get": op("Alerts (exfiltration, rug-pull, log-tampered), newest first, with their deliveries (by role)", true) },
            "/api/v1/alerts/{id}/ack": { "post": op("Acknowledge an alert (org admins; team admins their team's)", true) },
            "/api/v1/webhooks": { "post": op("Add a webhook for alerts: {url, format: json|slack}; returns its signing secret once (org admins)", true),
                                  "get": op("Webhooks with delivered, pending and attempted counts (org admins, auditors)", true) },
            "/api/v1/webhooks/{id}": { "delete": op("Remove a webhook (org admins)", true) },
            "/api/v1/admin-log": { "get": op("The server's own chained audit trail of administrative actions, as JSON lines (org admins, auditors)", true) },
            "/api/v1/siem": { "get": op("Each SIEM sink (--syslog, --otlp-logs): records delivered and pending, its last success and error (org admins, auditors)", true) },
            "/api/v1/admin-log/verify": { "get": op("Whether that chain is intact, or its first broken record (org admins, auditors)", true) },
        }
    }))
}
