//! The endpoint's HTTP server (tiny_http, one thread): `/metrics`,
//! `/dashboard` (also `/`), `/api/migrations`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::anyhow;
use tiny_http::{Header, Request, Response, Server};
use tracing::{info, warn};

use super::exposition::{self, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};
use super::Metrics;

/// The dashboard page (HTML and JS; it polls `/api/migrations`).
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// Binds `addr` and serves on a thread; returns the bound address.
pub fn serve(addr: SocketAddr, m: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    let server =
        Server::http(addr).map_err(|e| anyhow!("binding the metrics endpoint {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| anyhow!("metrics endpoint {addr}: not an IP address"))?;
    info!("metrics endpoint http://{bound}/metrics, dashboard http://{bound}/dashboard");
    std::thread::Builder::new()
        .name("dwcp-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                if let Err(e) = answer(&m, req) {
                    warn!("metrics endpoint: {e}");
                }
            }
        })?;
    Ok(bound)
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a valid header")
}

fn answer(m: &Metrics, req: Request) -> std::io::Result<()> {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    if *req.method() != tiny_http::Method::Get && *req.method() != tiny_http::Method::Head {
        return req.respond(Response::from_string("only GET\n").with_status_code(405));
    }
    let accept = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Accept"))
        .map(|h| h.value.as_str().to_string());
    let (body, ctype) = match path.as_str() {
        "/metrics" => {
            if exposition::wants_openmetrics(accept.as_deref()) {
                (m.openmetrics(), OPENMETRICS_CONTENT_TYPE)
            } else {
                (m.text(), TEXT_CONTENT_TYPE)
            }
        }
        "/" | "/dashboard" => (DASHBOARD.to_string(), "text/html; charset=utf-8"),
        "/api/migrations" => (m.migrations_json().to_string(), "application/json"),
        _ => {
            return req.respond(
                Response::from_string("not found: try /metrics, /dashboard, /api/migrations\n")
                    .with_status_code(404),
            )
        }
    };
    req.respond(
        Response::from_string(body)
            .with_header(header("Content-Type", ctype))
            .with_header(header("Cache-Control", "no-store")),
    )
}
