//! Running as a service: readiness and stop notifications to systemd
//! (`sd_notify`, `Type=notify`) and the agent's signals.
//!
//! - SIGTERM, SIGINT: [`Agent::shutdown`]: new migrations are refused, those
//!   in flight get the grace period, then fail with a reason; exit 0.
//! - SIGHUP: the TLS credentials (`--tls-dir`) are re-read; migrations in
//!   flight keep theirs, and a directory that does not load leaves the old
//!   ones in force (the log names the file and why). The configuration file
//!   itself is read at start only.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use anyhow::{Context, Result};
use dwcp_core::agent::Agent;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

/// Sends `state` (e.g. `READY=1`) to systemd when it started us with
/// `NOTIFY_SOCKET`; does nothing otherwise. Failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let send = || -> std::io::Result<()> {
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    };
    if let Err(e) = send() {
        warn!("sd_notify {state:?} to {path:?}: {e}");
    }
}

/// Serves the agent's signals until SIGTERM or SIGINT, then shuts it down.
pub fn serve_signals(agent: &Agent, grace: Duration) -> Result<()> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    for sig in signals.forever() {
        match sig {
            SIGHUP => {
                info!("SIGHUP: reloading the TLS credentials");
                // reload_tls logs the outcome (error: the file and why).
                let _ = agent.reload_tls();
            }
            _ => {
                notify("STOPPING=1");
                let r = agent.shutdown(grace);
                info!(
                    "stopped: {} migration(s) finished in the grace period, {} failed by the shutdown",
                    r.drained, r.aborted
                );
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_notify_socket() {
        let dir = std::env::temp_dir().join(format!("dwcp-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        // No other test reads NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
