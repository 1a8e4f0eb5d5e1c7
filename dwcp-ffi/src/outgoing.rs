//! The source side: one [`Session`] to the destination, one socketpair per
//! QEMU connection. Safe Rust; the C surface is in lib.rs.

use std::os::fd::OwnedFd;

use dwcp_core::transport::{ChannelWriter, FailReason, Session, SessionStats};

use crate::error::{dwcp_result::*, Error};
use crate::uri::DwcpUri;

/// An outgoing migration (the `dwcp_outgoing` handle).
#[derive(Debug)]
pub struct Outgoing {
    session: Session,
    channels: std::sync::atomic::AtomicUsize,
}

impl Outgoing {
    /// Resolves, connects every stream and handshakes. Blocks for at most
    /// about the URI's connect-timeout.
    pub fn connect(uri: &str) -> Result<Outgoing, Error> {
        let uri = DwcpUri::parse(uri).map_err(|m| Error::new(DWCP_INVALID_URI, m))?;
        if uri.port == 0 {
            return Err(Error::new(
                DWCP_INVALID_URI,
                "port 0 is only valid for an incoming URI",
            ));
        }
        let addr = uri
            .resolve()
            .map_err(|m| Error::new(DWCP_RESOLVE_FAILED, m))?;
        let mut cfg = uri.cfg.clone();
        if cfg.tls.hostname.is_none() && uri.host.parse::<std::net::IpAddr>().is_err() {
            // dwcp:NAME:PORT: the certificate must carry NAME (as QEMU's
            // tls: migrations check the host name given).
            cfg.tls.hostname = Some(uri.host.clone());
        }
        crate::uri::warn_insecure(&cfg);
        let session = Session::connect(&cfg, &uri.name, addr).map_err(Error::connect)?;
        Ok(Outgoing {
            session,
            channels: Default::default(),
        })
    }

    /// A new channel: returns QEMU's end of a fresh socketpair.
    pub fn channel(&self) -> Result<OwnedFd, Error> {
        self.check_live()?;
        let (ours, theirs) = crate::socketpair::channel_pair()
            .map_err(|e| Error::new(DWCP_IO, format!("socketpair for a channel: {e}")))?;
        self.session
            .add_local_channel(ours)
            .map_err(Error::channel)?;
        self.channels
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(OwnedFd::from(theirs))
    }

    /// A new channel written with the returned [`ChannelWriter`] (no relay
    /// copy); the fd (QEMU's end of a socketpair) only carries what the peer
    /// sends back (the return path) and sees end of file at completion.
    pub fn channel_direct(&self) -> Result<(OwnedFd, ChannelWriter), Error> {
        self.check_live()?;
        let (ours, theirs) = crate::socketpair::channel_pair()
            .map_err(|e| Error::new(DWCP_IO, format!("socketpair for a channel: {e}")))?;
        let w = self
            .session
            .add_direct_channel(ours)
            .map_err(Error::channel)?;
        self.channels
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok((OwnedFd::from(theirs), w))
    }

    fn check_live(&self) -> Result<(), Error> {
        match self.session.failure() {
            Some(reason) => Err(Error::failure(&reason)),
            None => Ok(()),
        }
    }

    /// Why the session failed, once it has.
    pub fn failure(&self) -> Option<FailReason> {
        self.session.failure()
    }

    pub fn stats(&self) -> SessionStats {
        self.session.stats()
    }

    pub fn cancel(&self, reason: &str) {
        self.session.cancel(reason);
    }
}

impl Drop for Outgoing {
    /// Freeing the handle detaches the session: a migration in flight keeps
    /// draining to the destination and ends on its own (completion, or the
    /// idle timeout). A session that never got a channel is aborted.
    fn drop(&mut self) {
        if self.channels.load(std::sync::atomic::Ordering::Acquire) == 0 {
            self.session.abort("freed before any channel was opened");
        }
    }
}
