//! The destination side: a listener whose sessions hand each new channel to
//! QEMU, queued until QEMU takes it, either as a [`ChannelReader`] (QEMU
//! reads straight from the session) plus a socket for the return path, or
//! as one end of a socketpair that a relay thread fills. Safe Rust; the C
//! surface is in lib.rs.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dwcp_core::transport::{
    Acceptor, AcceptorLimits, ChannelReader, FailReason, Session, SessionStats, Target,
};

use crate::error::{dwcp_result::*, Error};
use crate::uri::DwcpUri;

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Shared {
    /// Channels not yet taken: QEMU's end of the socketpair, the reader.
    queue: Mutex<VecDeque<(OwnedFd, ChannelReader)>>,
    ready: Condvar,
    /// One byte per queued channel: readable exactly while the queue is not
    /// empty, so QEMU can watch `notify_rx` in its main loop.
    notify_tx: UnixStream,
    notify_rx: UnixStream,
    sessions: Mutex<Vec<Session>>,
    stop: AtomicBool,
    cancelled: Mutex<Option<String>>,
}

/// A listening incoming migration (the `dwcp_incoming` handle).
#[derive(Debug)]
pub struct Incoming {
    shared: Arc<Shared>,
    local: SocketAddr,
    accept_thread: Option<JoinHandle<()>>,
}

impl Incoming {
    /// Parses the URI and binds HOST:PORT; accepting runs on a thread.
    pub fn listen(uri: &str) -> Result<Incoming, Error> {
        let uri = DwcpUri::parse(uri).map_err(|m| Error::new(DWCP_INVALID_URI, m))?;
        let addr = uri
            .resolve()
            .map_err(|m| Error::new(DWCP_RESOLVE_FAILED, m))?;
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::new(DWCP_LISTEN_FAILED, format!("listening on {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::new(DWCP_LISTEN_FAILED, e.to_string()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::new(DWCP_IO, e.to_string()))?;
        let (notify_tx, notify_rx) = UnixStream::pair()
            .map_err(|e| Error::new(DWCP_IO, format!("notification socketpair: {e}")))?;
        notify_rx
            .set_nonblocking(true)
            .map_err(|e| Error::new(DWCP_IO, e.to_string()))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            notify_tx,
            notify_rx,
            sessions: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            cancelled: Mutex::new(None),
        });
        // Weak: the acceptor (owned by the accept thread) must not keep the
        // queue alive after the handle is freed.
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        let connector = Target::Direct(Arc::new(move |sock, reader| {
            let shared = weak
                .upgrade()
                .ok_or_else(|| std::io::Error::other("incoming handle freed"))?;
            shared.push_channel(sock, reader)
        }));
        // TLS (the default): the credentials are read once, here, so a
        // missing or broken file fails the listen, not each connection.
        let mut cfg = uri.cfg.clone();
        cfg.tls.load().map_err(|e| {
            Error::new(
                DWCP_LISTEN_FAILED,
                format!("TLS credentials (tls-dir=, or insecure=1 for clear text): {e}"),
            )
        })?;
        crate::uri::warn_insecure(&cfg);
        let acceptor = Arc::new(Acceptor::with_connector(
            cfg,
            AcceptorLimits::default(),
            connector,
        ));
        let sh = shared.clone();
        let accept_thread = std::thread::Builder::new()
            .name("dwcp-accept".into())
            .spawn(move || accept_loop(listener, acceptor, sh))
            .map_err(|e| Error::new(DWCP_IO, format!("starting the accept thread: {e}")))?;
        Ok(Incoming {
            shared,
            local,
            accept_thread: Some(accept_thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn notify_fd(&self) -> RawFd {
        self.shared.notify_rx.as_raw_fd()
    }

    /// The next channel for QEMU as a socket carrying both directions (a
    /// relay thread writes the stream into it); `DWCP_AGAIN` when none
    /// arrived within `timeout` (`None` waits forever).
    pub fn next_channel(&self, timeout: Option<Duration>) -> Result<OwnedFd, Error> {
        let (fd, reader) = self.next_channel_direct(timeout)?;
        reader
            .relay()
            .map_err(|e| Error::new(DWCP_IO, format!("starting a channel relay: {e}")))?;
        Ok(fd)
    }

    /// The next channel for QEMU: its reader, and a socket for the return
    /// path; as [`Incoming::next_channel`] otherwise.
    pub fn next_channel_direct(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(OwnedFd, ChannelReader), Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(reason) = self
                .shared
                .cancelled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Err(Error::failure(&FailReason::Cancelled(reason)));
            }
            if let Some(taken) = q.pop_front() {
                let mut b = [0u8; 1];
                let _ = (&self.shared.notify_rx).read(&mut b);
                return Ok(taken);
            }
            let wait = match deadline {
                None => Duration::from_millis(200),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Error::new(DWCP_AGAIN, "no incoming channel yet"));
                    }
                    (d - now).min(Duration::from_millis(200))
                }
            };
            q = self
                .shared
                .ready
                .wait_timeout(q, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stats of the most recent session; `None` before the first one.
    pub fn stats(&self) -> Option<SessionStats> {
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .map(Session::stats)
    }

    /// Stops accepting, fails every session, closes queued channels.
    pub fn cancel(&self, reason: &str) {
        // The first reason sticks, as for an outgoing session.
        let reason = self
            .shared
            .cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| reason.to_string())
            .clone();
        self.shared.stop.store(true, Ordering::Release);
        for s in self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            s.cancel(&reason);
        }
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.shared.ready.notify_all();
    }
}

impl Shared {
    fn push_channel(&self, sock: UnixStream, reader: ChannelReader) -> std::io::Result<()> {
        if self.stop.load(Ordering::Acquire) {
            return Err(std::io::Error::other(
                "the incoming dwcp handle was cancelled or freed",
            ));
        }
        crate::socketpair::tune(&sock);
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((OwnedFd::from(sock), reader));
        (&self.notify_tx).write_all(&[1])?;
        self.ready.notify_all();
        Ok(())
    }
}

fn accept_loop(listener: TcpListener, acceptor: Arc<Acceptor>, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let acceptor = acceptor.clone();
                let weak = Arc::downgrade(&shared);
                // The handshake blocks (up to its timeout): one thread per
                // connection so a slow peer cannot hold up the others.
                let _ = std::thread::Builder::new()
                    .name("dwcp-hello".into())
                    .spawn(move || match acceptor.handle(stream) {
                        // Nothing reached the embedder: say why on its
                        // stderr (QEMU's log), as QEMU reports a failed TLS
                        // handshake of its own.
                        Err(e) => eprintln!("libdwcp: refused a connection from {peer}: {e}"),
                        Ok(None) => {}
                        Ok(Some(session)) => {
                            match weak.upgrade() {
                                Some(sh) if !sh.stop.load(Ordering::Acquire) => sh
                                    .sessions
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(session),
                                // Freed meanwhile: detach (the session still ends on its own).
                                Some(sh)
                                    if sh
                                        .cancelled
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .is_some() =>
                                {
                                    session.abort("incoming dwcp handle cancelled")
                                }
                                _ => {}
                            }
                        }
                    });
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                std::thread::sleep(ACCEPT_POLL)
            }
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

impl Drop for Incoming {
    /// Freeing stops accepting and closes channels QEMU never took; sessions
    /// already running are detached and end on their own.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}
