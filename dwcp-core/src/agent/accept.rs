//! The destination side: the data port. Each connection's handshake runs on
//! its own thread; a new session is remembered, watched, and (on a cluster
//! member) gated by the prepared entry of its name.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::State;
use crate::transport::{Acceptor, Authorizer, GateProvider};

pub(super) fn accept_loop(st: Arc<State>, l: TcpListener) {
    let mut acceptor = Acceptor::new(
        st.cfg.transport.clone(),
        st.cfg.limits.clone(),
        st.cfg.incoming_dir.clone(),
    );
    let s2 = st.clone();
    let auth: Authorizer = Arc::new(move |name, id, peer| s2.authorize(name, id, peer));
    acceptor = acceptor.with_authorizer(auth);
    if st.cfg.cluster.is_some() {
        let s2 = st.clone();
        let gates: GateProvider = Arc::new(move |name, peer| s2.gate_for(name, peer));
        acceptor = acceptor.with_gates(gates);
    }
    let acceptor = Arc::new(acceptor);
    for conn in l.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!("data port accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = conn
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        if let Err(why) = st.check_not_draining() {
            warn!("data port: refused connection from {peer}: {why}");
            continue; // dropping it closes it: the source's handshake fails
        }
        let (st, acceptor) = (st.clone(), acceptor.clone());
        // Each handshake on its own thread: a slow or hostile peer never
        // holds up others.
        std::thread::spawn(move || match acceptor.handle(conn) {
            Ok(Some(session)) => {
                st.remember(&session);
                st.watch_session(session);
            }
            Ok(None) => {}
            Err(e) => warn!("data port: rejected connection from {peer}: {e}"),
        });
    }
}
