//! DWCP engine: moves a QEMU live migration between hosts over many TCP
//! streams with tiered compression and page deduplication.
//!
//! - [`wire`]: the handshake and frame format (documented in docs/protocol.md)
//! - [`transport`]: sessions of N TCP streams carrying QEMU's channels
//! - [`codec`]: zero runs, page dedup, lz4/zstd tiers
//! - [`agent`]: the per-host daemon relaying QEMU's UNIX-socket migrations
//! - [`cutover`]: the agent's cutover gate on the cluster (`agent::cutover`)
//! - [`qemu`]: QMP client and migration driver
//! - [`predict`]: bandwidth predictors (last value, EWMA, harmonic mean, LSTM in ONNX)
//! - [`tls`]: TLS 1.3 with mutual authentication (rustls), libvirt's PKI layout
//! - [`adapt`]: link samples, the datacenter/hybrid/internet detector, the ETA
pub mod adapt;
pub mod agent;
pub mod codec;
pub mod predict;
pub mod qemu;
pub mod tls;
pub mod transport;
pub mod wire;

/// The cutover gate lives with the agent that runs it; this is its old path.
pub use agent::cutover;
