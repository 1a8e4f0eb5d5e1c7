//! The destination side: the data port. Each connection's handshake runs on
//! its own thread; a new session is remembered, watched, and (on a cluster
//! member) gated by the prepared entry of its name.

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::State;
use crate::transport::{Acceptor, Authorizer, GateProvider, TcpDelivery};

pub(super) fn accept_loop(st: Arc<State>, l: TcpListener) {
    let mut acceptor = Acceptor::new(
        st.cfg.transport.clone(),
        st.cfg.limits.clone(),
        st.cfg.incoming_dir.clone(),
    );
    let s2 = st.clone();
    let auth: Authorizer = Arc::new(move |name, id, peer| s2.authorize(name, id, peer));
    acceptor = acceptor.with_authorizer(auth);
    if !st.cfg.nova.deliver_tcp.is_empty() {
        let s2 = st.clone();
        let tcp: TcpDelivery = Arc::new(move |name| s2.tcp_delivery(name));
        acceptor = acceptor.with_tcp_delivery(tcp);
    }
    if st.cfg.cluster.is_some() {
        let s2 = st.clone();
        let gates: GateProvider = Arc::new(move |name, peer| s2.gate_for(name, peer));
        acceptor = acceptor.with_gates(gates);
    }
    let acceptor = Arc::new(acceptor);
    // Connections in their TLS handshake and hello: each holds a thread and
    // its TLS state until it joins a session or fails (the handshake timeout
    // bounds how long), so their number is bounded too. At the bound the
    // loop stops accepting until one finishes: the connections beyond it
    // wait in the kernel's accept queue (bounded by the listen backlog),
    // and the source's own handshake timeout bounds their wait. Refusing
    // them instead failed migrations that a moment later would have gone
    // through: with hundreds starting at once, 295 of 2,247 failures of a
    // 1,000-guest load test were such resets.
    let handshaking = Arc::new(AtomicUsize::new(0));
    let max_handshakes = st.cfg.limits.max_handshakes.max(1);
    loop {
        let mut waited = false;
        while handshaking.load(Ordering::Acquire) >= max_handshakes {
            if !waited {
                warn!(
                    "data port: {max_handshakes} connections are in their handshake; \
                     new ones wait in the accept queue"
                );
                waited = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let conn = match l.accept() {
            Ok((c, _)) => c,
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
        handshaking.fetch_add(1, Ordering::AcqRel);
        let (st, acceptor, handshaking) = (st.clone(), acceptor.clone(), handshaking.clone());
        // Each handshake on its own thread: a slow or hostile peer never
        // holds up others.
        std::thread::spawn(move || {
            let r = acceptor.handle(conn);
            handshaking.fetch_sub(1, Ordering::AcqRel);
            match r {
                Ok(Some(session)) => {
                    st.remember(&session);
                    st.watch_session(session);
                }
                Ok(None) => {}
                Err(e) => warn!("data port: rejected connection from {peer}: {e}"),
            }
        });
    }
}
