//! Helpers shared by the loopback transport tests.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};

use std::time::Duration;

use dwcp_core::codec::Tier;
use dwcp_core::transport::{Acceptor, Session, Target, TransportConfig};

/// A small, fixed configuration for loopback tests: `streams` streams,
/// `tier` without the auto tier, a 4 MiB window of 256 KiB chunks.
#[allow(dead_code)] // not every test crate that includes this module uses it
pub fn loopback_cfg(streams: u16, tier: Tier) -> TransportConfig {
    TransportConfig {
        streams,
        tier,
        auto_tier: false,
        workers: 2,
        window: 4 << 20,
        chunk: 256 << 10,
        idle_timeout: Duration::from_secs(5),
        tls: dwcp_core::transport::TlsSettings::insecure(),
        ..TransportConfig::default()
    }
}

/// A responder target whose channels are socketpairs: the transport gets one
/// end, the other ("QEMU's end", with its channel id) comes out of the
/// returned receiver.
#[allow(dead_code)] // not every test crate that includes this module uses it
pub fn socketpair_target() -> (Target, mpsc::Receiver<(u16, UnixStream)>) {
    let (tx, ends) = mpsc::channel();
    let tx = Mutex::new(tx);
    let target = Target::Connector(Arc::new(move |id| {
        let (ours, qemu) = UnixStream::pair()?;
        tx.lock().unwrap().send((id, qemu)).unwrap();
        Ok(ours)
    }));
    (target, ends)
}

/// A responder listening on loopback: the sessions it accepted and the
/// handshake errors it saw.
pub struct Served {
    pub addr: SocketAddr,
    pub sessions: Arc<Mutex<Vec<Session>>>,
    /// Not read by every test crate that includes this module.
    #[allow(dead_code)]
    pub errors: Arc<Mutex<Vec<String>>>,
}

/// Accepts connections for `acceptor` on 127.0.0.1 (a thread per
/// handshake, as the agent does).
pub fn serve(acceptor: Acceptor) -> Served {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = Arc::new(acceptor);
    let sessions = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let (s2, e2) = (sessions.clone(), errors.clone());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let (a, s, e) = (acceptor.clone(), s2.clone(), e2.clone());
            std::thread::spawn(move || match a.handle(c) {
                Ok(Some(sess)) => s.lock().unwrap().push(sess),
                Ok(None) => {}
                Err(err) => e.lock().unwrap().push(err.to_string()),
            });
        }
    });
    Served {
        addr,
        sessions,
        errors,
    }
}
