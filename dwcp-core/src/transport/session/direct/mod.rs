//! Direct channels: the embedder (libdwcp inside QEMU) writes a source
//! channel's bytes itself ([`writer::ChannelWriter`]) or reads a destination
//! channel's bytes straight from the reorder buffer
//! ([`reader::ChannelReader`]), with no relay thread or socketpair copy.

pub(super) mod reader;
pub(super) mod ready;
pub(super) mod writer;
