//! Multi-stream transport (AMST): one migration is one [`Session`] of N TCP
//! streams carrying any number of *channels* (one per QEMU connection: the
//! main migration channel, multifd channels), in both directions.
//!
//! ```text
//!  QEMU conn ─► local reader ─(plan: dedup, zero runs)─► encode pool ─► frame queue ─► stream writers ═╗
//!  (channel c)   waits for credit                          compress      (bounded)      (N TCP)       ║
//!                                                                                                     ║ TCP
//!  QEMU conn ◄── deliverer ◄─(in order by seq, rebuild)── reorder buffer ◄── decompress ◄── stream readers ◄╝
//!                   └── returns credit (Window frames) ──► peer's local reader
//! ```
//!
//! Memory is bounded by construction: a sender may have at most `window`
//! raw bytes of a channel outstanding (the receiver returns credit only after
//! it has written bytes to QEMU), queues between threads are bounded, and
//! every length read from the wire is checked against a cap before anything
//! is allocated. A channel whose QEMU end stops reading only stalls that
//! channel: stream readers never block on delivery.
//!
//! Any error (a stream that dies, a checksum that fails, a peer that goes
//! quiet for `idle_timeout`) fails the whole session: an `Abort` frame goes to
//! the peer, every socket is shut down, QEMU on each side sees its migration
//! connection fail. Nothing that failed a check is ever written to QEMU.

pub mod budget;
pub mod gate;
mod handshake;
pub(crate) mod link;
pub mod options;
mod session;
pub mod tcp;

use std::time::Duration;

pub use gate::CutoverGate;
pub use handshake::{
    Acceptor, AcceptorLimits, Authorizer, GateProvider, Refusal, TcpDelivery, DEFAULT_MAX_SESSIONS,
};
pub use link::TlsSettings;
pub use session::{
    ChannelReader, ChannelStats, ChannelWriter, CodecCounts, DirectHandOver, FailReason, LocalConn,
    PeerRefusal, ReadError, Role, Session, SessionError, SessionState, SessionStats, StreamStats,
    Target, WriteError,
};
pub use tcp::{tcp_info, SocketTuning, TcpInfo};

use crate::codec::{Tier, MAX_RAW_LEN};

/// Most TCP streams one session may use (owned by the wire format).
pub use crate::wire::MAX_STREAMS;

/// A configuration value outside its allowed range.
#[derive(Debug, thiserror::Error)]
#[error("{option} = {value} is out of range: {allowed}")]
pub struct ConfigError {
    pub option: String,
    pub value: String,
    pub allowed: &'static str,
}

/// Settings of one migration session.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// TCP streams per session, 1..=256.
    pub streams: u16,
    /// Compression tier for new frames (can change during a session).
    pub tier: Tier,
    /// Let the session pick the tier (`--codec auto`, the default): raw on
    /// datacenter paths, lz4 otherwise, then up to zstd:1 and zstd:3 while
    /// the link is the bottleneck, down while compression is.
    pub auto_tier: bool,
    /// Compression worker threads, 1..=64.
    pub workers: usize,
    /// Flow-control window per channel, raw bytes.
    pub window: u32,
    /// Dedup ring per channel, MiB (0 disables page deduplication).
    pub dedup_cache_mb: u32,
    /// Dedup spill file per channel, MiB (0: none): pages leaving the
    /// in-memory ring stay referable from an unlinked file in
    /// [`Self::spill_dir`], on both ends. A destination grants at most its
    /// own; a peer that does not know spill files gets none.
    pub spill_mb: u32,
    /// Where spill files are created ([`default_spill_dir`]).
    pub spill_dir: std::path::PathBuf,
    /// Send a re-sent page as a delta against the version the peer holds
    /// in its dedup ring when that is smaller (docs/hde.md); on both ends
    /// (asked in the hello, granted in the reply; peers before deltas
    /// grant none).
    pub delta: bool,
    /// Most channels (QEMU connections) per session, 1..=64.
    pub max_channels: u16,
    /// Memory one session may take, bytes (`session-memory`): a destination
    /// grants windows and rings within it ([`budget`]), a source asks for
    /// no more than fits in its own.
    pub session_memory: u64,
    /// Largest read from QEMU per frame, bytes.
    pub chunk: usize,
    /// Give raw (uncompressed) frames a payload CRC too (`checksum=all`).
    /// Off by default (`checksum=compressed`): raw frames, the datacenter
    /// tier, then go out straight from QEMU's buffers, with TCP's checksum
    /// only, as QEMU's own `tcp:` stream does; a CRC would need a copy
    /// first, since the guest may rewrite a page while it is being sent.
    /// Compressed frames always carry one. Both ends' headers keep theirs.
    pub checksum_raw: bool,
    pub tuning: SocketTuning,
    /// TLS (the default) or clear text, the credentials and the names to
    /// verify ([`TlsSettings`]).
    pub tls: TlsSettings,
    /// A session with no frame from the peer for this long fails.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Link samples and the mode detector ([`crate::adapt`]).
    pub adapt: crate::adapt::AdaptConfig,
    /// Kept copies of guests for re-migration ([`crate::codec::keep`]):
    /// a session records what it moves into it, and a destination announces
    /// the copy it holds of the incoming guest. None: neither.
    pub keep: Option<std::sync::Arc<crate::codec::keep::KeepStore>>,
    /// This migration keeps a copy in [`Self::keep`] on both ends (asked in
    /// the hello; `keep=0` turns it off for one route).
    pub keep_copy: bool,
    /// Compression with context across frames ([`crate::codec::context`]);
    /// both ends must allow it.
    pub context: ContextUse,
}

/// When zstd frames are compressed with context across a channel's frames
/// ([`crate::codec::context`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContextUse {
    /// Never (and the destination refuses such frames).
    Off,
    /// While the link is slow and the encoders idle (the default).
    #[default]
    Auto,
    /// Whenever the tier is zstd.
    Always,
}

impl ContextUse {
    /// The option's spelling (`0`, `auto`, `always`).
    pub fn as_str(self) -> &'static str {
        match self {
            ContextUse::Off => "0",
            ContextUse::Auto => "auto",
            ContextUse::Always => "always",
        }
    }
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            streams: 4,
            tier: Tier::Lz4,
            auto_tier: true,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            window: 32 << 20,
            dedup_cache_mb: 256,
            spill_mb: DEFAULT_SPILL_MB,
            spill_dir: default_spill_dir(),
            delta: true,
            max_channels: 8,
            session_memory: budget::DEFAULT_SESSION_MEMORY,
            chunk: 512 << 10,
            checksum_raw: false,
            tuning: SocketTuning::default(),
            tls: TlsSettings::default(),
            idle_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            adapt: crate::adapt::AdaptConfig::default(),
            keep: None,
            keep_copy: true,
            context: ContextUse::Auto,
        }
    }
}

/// Whether a file can be created (and removed) in `dir`.
fn spill_dir_usable(dir: &std::path::Path) -> bool {
    // A name of this call's own: the streams of a session are handshaken on
    // threads of their own, and with one name per process one probe's
    // remove_file took another's file away, so that probe failed and its
    // session ran without a spill file (6 of 21 sessions of one benchmark).
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = dir.join(format!(".dwcp-spill-probe-{}-{n}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
    {
        Ok(_) => std::fs::remove_file(&probe).is_ok(),
        Err(_) => false,
    }
}

/// Default dedup spill file per channel, MiB.
pub const DEFAULT_SPILL_MB: u32 = 1024;
/// Largest dedup spill file per channel, MiB.
pub const MAX_SPILL_MB: u32 = 65536;

/// The agent's state directory when systemd gives it one
/// (`$STATE_DIRECTORY`: /var/lib/dwcp under dwcp-agent.service, the first
/// if it names several), else `$TMPDIR`, else `/var/tmp` (on disk on most
/// systems, unlike `/tmp` and `/run`, which may be RAM).
pub fn default_spill_dir() -> std::path::PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(s) = var("STATE_DIRECTORY") {
        let s = s.to_string_lossy().into_owned();
        if let Some(first) = s.split(':').next().filter(|f| !f.is_empty()) {
            return std::path::PathBuf::from(first);
        }
    }
    var("TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/var/tmp"))
}

impl TransportConfig {
    /// Checks every value; the error names the option and its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use options::*;
        fn bad(
            option: &'static str,
            value: impl ToString,
            allowed: &'static str,
        ) -> Result<(), ConfigError> {
            Err(ConfigError {
                option: option.to_string(),
                value: value.to_string(),
                allowed,
            })
        }
        if self.streams == 0 || self.streams as usize > MAX_STREAMS {
            return bad("streams", self.streams, STREAMS_RANGE);
        }
        if self.workers == 0 || self.workers > 64 {
            return bad("workers", self.workers, WORKERS_RANGE);
        }
        if self.chunk < 4096 || self.chunk > MAX_RAW_LEN {
            return bad("chunk", self.chunk, "4096..=1048576 bytes");
        }
        if (self.window as usize) < 2 * self.chunk || self.window > 256 << 20 {
            return bad("window", self.window, "2 x chunk ..= 256 MiB");
        }
        if self.dedup_cache_mb > 4096 {
            return bad("dedup-cache-mb", self.dedup_cache_mb, DEDUP_MB_RANGE);
        }
        if self.spill_mb > MAX_SPILL_MB {
            return bad("spill-mb", self.spill_mb, SPILL_MB_RANGE);
        }
        if self.max_channels == 0 || self.max_channels > 64 {
            return bad("max-channels", self.max_channels, "1..=64");
        }
        if !(budget::MIN_SESSION_MEMORY..=budget::MAX_SESSION_MEMORY).contains(&self.session_memory)
            || !self.session_memory.is_multiple_of(1 << 20)
        {
            return bad(
                "session-memory",
                self.session_memory >> 20,
                budget::SESSION_MEMORY_RANGE,
            );
        }
        if self.idle_timeout < Duration::from_secs(1)
            || self.idle_timeout > Duration::from_secs(3600)
        {
            return bad(
                "idle-timeout",
                format!("{:?}", self.idle_timeout),
                IDLE_TIMEOUT_RANGE,
            );
        }
        let every = self.adapt.sample_interval;
        if every < Duration::from_millis(100) || every > Duration::from_secs(1) {
            return bad(
                "link-sample-ms",
                every.as_millis(),
                crate::adapt::SAMPLE_INTERVAL_RANGE,
            );
        }
        if let Err(e) = self.adapt.mode.check() {
            return Err(ConfigError {
                option: "mode".into(),
                value: e,
                allowed: "each datacenter threshold below its internet one",
            });
        }
        if let Some(cc) = &self.tuning.congestion {
            if cc.is_empty()
                || cc.len() > 15
                || !cc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return bad(
                    "congestion",
                    cc,
                    "a kernel congestion control name such as bbr or cubic",
                );
            }
        }
        Ok(())
    }

    /// Sets the payload checksum policy from its name: `all` (every frame)
    /// or `compressed` (compressed frames only; see [`Self::checksum_raw`]).
    pub fn set_checksum(&mut self, name: &str) -> Result<(), String> {
        self.checksum_raw = match name {
            "all" => true,
            "compressed" => false,
            _ => return Err(format!("'{name}': expected all or compressed")),
        };
        Ok(())
    }

    /// Sets the codec from its name: a tier (`none`, `lz4`, `zstd`, `zstd:N`)
    /// or `auto`.
    pub fn set_codec(&mut self, name: &str) -> Result<(), String> {
        if name == "auto" {
            self.auto_tier = true;
            self.tier = Tier::Lz4;
        } else {
            self.tier = name
                .parse::<Tier>()
                .map_err(|e| format!("codec {name:?}: {e}, or auto"))?;
            self.auto_tier = false;
        }
        Ok(())
    }

    /// The codec's name as `set_codec` takes it.
    pub fn codec_name(&self) -> String {
        if self.auto_tier {
            "auto".into()
        } else {
            self.tier.to_string()
        }
    }

    /// Dedup ring capacity in pages, as carried in the hello.
    pub fn ring_pages(&self) -> u32 {
        ((self.dedup_cache_mb as u64) << 20 >> 12) as u32
    }

    /// Dedup spill file in pages, as carried in the hello: 0 without a ring
    /// or when [`Self::spill_dir`] is not a directory this process can
    /// create files in (checked by creating and removing one).
    pub fn spill_pages(&self) -> u32 {
        if self.spill_mb == 0 || self.dedup_cache_mb == 0 || !spill_dir_usable(&self.spill_dir) {
            return 0;
        }
        ((self.spill_mb as u64) << 20 >> 12) as u32
    }

    /// What this end grants (or, as a source, asks for) a session of
    /// `streams` streams asking `window` and `ring_pages`, within
    /// [`Self::session_memory`] ([`budget::grant`]).
    pub fn grant(
        &self,
        streams: u16,
        window: u32,
        ring_pages: u32,
    ) -> Result<budget::Grant, budget::OverBudget> {
        budget::grant(&budget::Ask {
            budget: self.session_memory,
            streams,
            workers: self.workers.min(u16::MAX as usize) as u16,
            chunk: self.chunk as u32,
            max_channels: self.max_channels,
            window,
            ring_pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streams of a session probe the spill directory at once: every
    /// probe must find it usable (one shared probe name made some fail).
    #[test]
    fn concurrent_spill_probes_all_find_the_directory_usable() {
        let dir = std::env::temp_dir().join(format!("dwcp-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let failed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..300 {
                        if !spill_dir_usable(&dir) {
                            failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let left = std::fs::read_dir(&dir).unwrap().count();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            failed.into_inner(),
            0,
            "probes that found the directory unusable"
        );
        assert_eq!(left, 0, "probe files left behind");
    }

    #[test]
    fn validate_names_the_option() {
        assert!(TransportConfig::default().validate().is_ok());
        let c = TransportConfig {
            streams: 0,
            ..Default::default()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "streams = 0 is out of range: 1..=256"
        );
        let c = TransportConfig {
            streams: 257,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("streams = 257"));
        let c = TransportConfig {
            window: 1024,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().starts_with("window"));
        let c = TransportConfig {
            workers: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().starts_with("workers"));
    }
}
