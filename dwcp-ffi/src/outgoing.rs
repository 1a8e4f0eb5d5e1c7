//! The source side: one [`Session`] to the destination, one socketpair per
//! QEMU connection. Safe Rust; the C surface is in lib.rs.

use std::os::fd::OwnedFd;

use dwcp_core::transport::{ChannelWriter, Session, SessionError, SessionStats, WriteError};

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
        let session = Session::connect(&uri.cfg, &uri.name, addr).map_err(|e| {
            let code = match &e {
                SessionError::Connect { .. } => DWCP_CONNECT_FAILED,
                SessionError::Handshake { .. } => DWCP_HANDSHAKE_FAILED,
                _ => DWCP_SESSION_FAILED,
            };
            Error::new(code, e.to_string())
        })?;
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
            .map_err(channel_error)?;
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
            .map_err(channel_error)?;
        self.channels
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok((OwnedFd::from(theirs), w))
    }

    fn check_live(&self) -> Result<(), Error> {
        match self.session.failure() {
            Some(e) if e.starts_with(CANCEL_PREFIX) => Err(Error::new(DWCP_CANCELLED, e)),
            Some(e) => Err(Error::new(DWCP_SESSION_FAILED, e)),
            None => Ok(()),
        }
    }

    pub fn stats(&self) -> SessionStats {
        self.session.stats()
    }

    pub fn cancel(&self, reason: &str) {
        self.session.abort(&format!("{CANCEL_PREFIX}{reason}"));
    }
}

fn channel_error(e: SessionError) -> Error {
    match e {
        SessionError::TooManyChannels(_) => Error::new(DWCP_TOO_MANY_CHANNELS, e.to_string()),
        SessionError::Finished => Error::new(DWCP_FINISHED, e.to_string()),
        _ => Error::new(DWCP_SESSION_FAILED, e.to_string()),
    }
}

/// The result code and message of a failed direct-channel write.
pub fn write_error(e: WriteError) -> Error {
    match e {
        WriteError::Failed(m) if m.starts_with(CANCEL_PREFIX) => Error::new(DWCP_CANCELLED, m),
        WriteError::Failed(m) => Error::new(DWCP_SESSION_FAILED, m),
        WriteError::Shutdown => Error::new(DWCP_CANCELLED, e.to_string()),
        WriteError::Ended => Error::new(DWCP_FINISHED, e.to_string()),
    }
}

/// Failure reasons of cancelled sessions start with this.
pub const CANCEL_PREFIX: &str = "cancelled: ";

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
