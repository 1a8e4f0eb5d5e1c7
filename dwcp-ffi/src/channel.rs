//! A `dwcp_channel` handle: the sending half of a source channel or the
//! receiving half of a destination channel. Safe Rust; the C surface is in
//! lib.rs.

use std::io::{IoSlice, IoSliceMut};

use dwcp_core::transport::{ChannelReader, ChannelWriter};

use crate::error::{dwcp_result::*, Error};

#[derive(Debug)]
pub enum Chan {
    Writer(ChannelWriter),
    Reader(ChannelReader),
}

impl Chan {
    pub fn writev(&self, bufs: &[IoSlice<'_>]) -> Result<usize, Error> {
        match self {
            Chan::Writer(w) => w.write_vectored(bufs).map_err(Error::from),
            Chan::Reader(_) => Err(Error::new(
                DWCP_INVALID_ARGUMENT,
                "this is a receiving channel (from dwcp_incoming_next_channel_direct); it cannot be written",
            )),
        }
    }

    /// `Ok(0)` is the end of the stream; `DWCP_AGAIN` when `block` is false
    /// and nothing is there yet.
    pub fn readv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        peek: bool,
        block: bool,
    ) -> Result<usize, Error> {
        match self {
            Chan::Reader(r) => r.read_vectored(bufs, peek, block).map_err(Error::from),
            Chan::Writer(_) => Err(Error::new(
                DWCP_INVALID_ARGUMENT,
                "this is a sending channel (from dwcp_outgoing_channel_direct); it cannot be read",
            )),
        }
    }

    pub fn ready_fd(&self) -> Result<std::os::fd::RawFd, Error> {
        match self {
            Chan::Reader(r) => Ok(r.ready_fd()),
            Chan::Writer(_) => Err(Error::new(
                DWCP_INVALID_ARGUMENT,
                "a sending channel has no readiness descriptor",
            )),
        }
    }

    pub fn shutdown(&self) {
        match self {
            Chan::Writer(w) => w.shutdown(),
            Chan::Reader(r) => r.shutdown(),
        }
    }
}
