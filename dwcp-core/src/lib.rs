//! DWCP engine.
pub mod codec;
