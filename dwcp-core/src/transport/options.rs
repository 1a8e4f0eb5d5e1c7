//! The transport options a user sets, in one table.
//!
//! The `dwcp` command line (`--streams 8`), the agent's control requests
//! (`{"op":"route","streams":8}`) and `dwcp:` URIs (`?streams=8`) all set a
//! [`TransportConfig`] through [`OPTIONS`], so an option is added in one place
//! and every surface names it and its range the same way in errors:
//! `streams = 0 is out of range: 1..=256` (the command line prefixes `--`).

use std::time::Duration;

use super::{ConfigError, TransportConfig, MAX_STREAMS};
use crate::codec::{ZSTD_MAX_LEVEL, ZSTD_MIN_LEVEL};

/// Allowed values of `streams`, as error messages and help show them.
pub const STREAMS_RANGE: &str = "1..=256";
/// Allowed values of `workers`.
pub const WORKERS_RANGE: &str = "1..=64";
/// Allowed values of the window, in MiB.
pub const WINDOW_MB_RANGE: &str = "1..=256 MiB";
/// Allowed values of the dedup ring, in MiB.
pub const DEDUP_MB_RANGE: &str = "0..=4096 MiB";
/// Allowed values of the dedup spill file, in MiB.
pub const SPILL_MB_RANGE: &str = "0..=65536 MiB";
/// Allowed values of the idle timeout.
pub const IDLE_TIMEOUT_RANGE: &str = "1..=3600 s";

/// One option: its name on each surface, its range and what it does.
#[derive(Debug)]
pub struct TransportOption {
    /// Command-line flag without `--` (kebab case).
    pub name: &'static str,
    /// Key in `dwcp:` URIs; `None`: not settable there.
    pub uri: Option<&'static str>,
    /// Field of the agent's `route` control request; `None`: not settable there.
    pub control: Option<&'static str>,
    /// Allowed values, as errors and help show them.
    pub allowed: &'static str,
    /// One line for `--help` and the docs.
    pub help: &'static str,
    set: fn(&mut TransportConfig, &str) -> Result<(), ()>,
    show: fn(&TransportConfig) -> String,
}

/// Which surface a value came from: decides how the option is named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `--name`
    Cli,
    /// `key=` of a `dwcp:` URI
    Uri,
    /// a field of a control request
    Control,
}

impl TransportOption {
    /// The option's name on `surface`.
    pub fn label(&self, surface: Surface) -> String {
        match surface {
            Surface::Cli => format!("--{}", self.name),
            Surface::Uri => self.uri.unwrap_or(self.name).to_string(),
            Surface::Control => self.control.unwrap_or(self.name).to_string(),
        }
    }

    /// Sets the option from its text form; the error names the option (as
    /// `surface` spells it), the value and the allowed range.
    pub fn apply(
        &self,
        cfg: &mut TransportConfig,
        value: &str,
        surface: Surface,
    ) -> Result<(), ConfigError> {
        (self.set)(cfg, value.trim()).map_err(|()| ConfigError {
            option: self.label(surface),
            value: value.to_string(),
            allowed: self.allowed,
        })
    }

    /// The option's current value in `cfg`, in the form `apply` takes.
    pub fn show(&self, cfg: &TransportConfig) -> String {
        (self.show)(cfg)
    }
}

fn int<T: std::str::FromStr + PartialOrd>(v: &str, lo: T, hi: T) -> Result<T, ()> {
    let n: T = v.parse().map_err(|_| ())?;
    if n < lo || n > hi {
        return Err(());
    }
    Ok(n)
}

/// A finite number within `lo..=hi`; a trailing `%` is allowed (and
/// ignored: the option's unit is already percent).
/// `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`.
fn flag(v: &str) -> Result<bool, ()> {
    match v {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(()),
    }
}

fn float(v: &str, lo: f64, hi: f64) -> Result<f64, ()> {
    let n: f64 = v.trim_end_matches('%').trim().parse().map_err(|_| ())?;
    if !n.is_finite() || n < lo || n > hi {
        return Err(());
    }
    Ok(n)
}

/// A float as `float` reads it back: no trailing zeros.
fn show_float(v: f64) -> String {
    let s = format!("{v:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A size in `unit` bytes: a plain number is in `unit`; `K`/`KiB`, `M`/`MiB`,
/// `G`/`GiB` (binary) name their own, and must come out a whole `unit`.
fn size(v: &str, unit: u64, lo: u64, hi: u64) -> Result<u64, ()> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let n: u64 = num.parse().map_err(|_| ())?;
    let bytes = match suffix.trim() {
        "" => return int(num, lo, hi),
        "K" | "KiB" | "k" => n.checked_mul(1 << 10),
        "M" | "MiB" => n.checked_mul(1 << 20),
        "G" | "GiB" => n.checked_mul(1 << 30),
        _ => None,
    }
    .ok_or(())?;
    if bytes % unit != 0 {
        return Err(());
    }
    int(&(bytes / unit).to_string(), lo, hi)
}

/// A duration: a plain number is seconds; `ms`, `s`, `m`, `h` name their own.
fn duration(v: &str, lo: Duration, hi: Duration) -> Result<Duration, ()> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let n: u64 = num.parse().map_err(|_| ())?;
    let d = match suffix.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60).ok_or(())?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or(())?),
        _ => return Err(()),
    };
    if d < lo || d > hi {
        return Err(());
    }
    Ok(d)
}

/// A size as the transport options take it (a plain number is in `unit`
/// bytes; `K`/`KiB`, `M`/`MiB`, `G`/`GiB`), in `unit`s within `lo..=hi`:
/// for other commands' flags, so sizes read the same everywhere.
pub fn parse_size(v: &str, unit: u64, lo: u64, hi: u64) -> Option<u64> {
    size(v.trim(), unit, lo, hi).ok()
}

/// A duration as the transport options take it (a plain number is seconds;
/// `ms`, `s`, `m`, `h`), within `lo..=hi`: for other commands' flags.
pub fn parse_duration(v: &str, lo: Duration, hi: Duration) -> Option<Duration> {
    duration(v.trim(), lo, hi).ok()
}

/// Every transport option, in the order help and error messages list them.
pub const OPTIONS: &[TransportOption] = &[
    TransportOption {
        name: "streams",
        uri: Some("streams"),
        control: Some("streams"),
        allowed: STREAMS_RANGE,
        help: "TCP streams per migration",
        set: |c, v| {
            c.streams = int(v, 1, MAX_STREAMS as u16)?;
            Ok(())
        },
        show: |c| c.streams.to_string(),
    },
    TransportOption {
        name: "codec",
        uri: Some("codec"),
        control: Some("codec"),
        allowed: "auto, raw, none, lz4, zstd, zstd:N (N in -7..=19)",
        help: "compression: auto (raw frames on datacenter paths, min RTT < 1 ms; \
               lz4 otherwise, up to zstd:3 while the link, not the CPU, is the \
               bottleneck) or a fixed tier: raw (pass-through), none (zero and \
               duplicate pages only), lz4, zstd, zstd:N",
        set: |c, v| {
            if let Some(n) = v.strip_prefix("zstd:") {
                int(n, ZSTD_MIN_LEVEL, ZSTD_MAX_LEVEL)?;
            }
            c.set_codec(v).map_err(|_| ())
        },
        show: |c| c.codec_name(),
    },
    TransportOption {
        name: "checksum",
        uri: Some("checksum"),
        control: Some("checksum"),
        allowed: "all, compressed",
        help: "payload checksums: compressed (CRC32C on compressed frames; raw \
               frames go straight from memory with TCP's checksum only, as \
               QEMU's tcp: does) or all (raw frames too, at one copy per byte)",
        set: |c, v| c.set_checksum(v).map_err(|_| ()),
        show: |c| if c.checksum_raw { "all" } else { "compressed" }.into(),
    },
    TransportOption {
        name: "workers",
        uri: Some("workers"),
        control: Some("workers"),
        allowed: WORKERS_RANGE,
        help: "compression worker threads (default: one per core)",
        set: |c, v| {
            c.workers = int(v, 1, 64)?;
            Ok(())
        },
        show: |c| c.workers.to_string(),
    },
    TransportOption {
        name: "window-mb",
        uri: Some("window"),
        control: Some("window_mb"),
        allowed: WINDOW_MB_RANGE,
        help: "flow-control window per channel, MiB (or with a unit: 64MiB)",
        set: |c, v| {
            c.window = (size(v, 1 << 20, 1, 256)? as u32) << 20;
            Ok(())
        },
        show: |c| (c.window >> 20).to_string(),
    },
    TransportOption {
        name: "dedup-cache-mb",
        uri: Some("dedup"),
        control: Some("dedup_cache_mb"),
        allowed: DEDUP_MB_RANGE,
        help: "page-dedup ring per channel, MiB (or 1GiB ...; 0 disables dedup)",
        set: |c, v| {
            c.dedup_cache_mb = size(v, 1 << 20, 0, 4096)? as u32;
            Ok(())
        },
        show: |c| c.dedup_cache_mb.to_string(),
    },
    TransportOption {
        name: "spill-mb",
        uri: Some("spill"),
        control: Some("spill_mb"),
        allowed: SPILL_MB_RANGE,
        help: "dedup spill file per channel, MiB (or 4GiB ...; 0: none): pages that leave the \
               in-memory dedup ring stay referable from an unlinked file in spill-dir, on both \
               hosts, so content sent once is not sent again; disk, not memory",
        set: |c, v| {
            c.spill_mb = size(v, 1 << 20, 0, 65536)? as u32;
            Ok(())
        },
        show: |c| c.spill_mb.to_string(),
    },
    TransportOption {
        name: "spill-dir",
        uri: Some("spill-dir"),
        control: Some("spill_dir"),
        allowed: "a directory",
        help: "directory for dedup spill files ($STATE_DIRECTORY under systemd, else $TMPDIR, else /var/tmp); the files are \
               unlinked at once, so nothing is left behind",
        set: |c, v| {
            if v.is_empty() {
                return Err(());
            }
            c.spill_dir = std::path::PathBuf::from(v);
            Ok(())
        },
        show: |c| c.spill_dir.display().to_string(),
    },
    TransportOption {
        name: "delta",
        uri: Some("delta"),
        control: Some("delta"),
        allowed: "0 or 1",
        help: "send a page that changed since it was sent as a delta against the version the \
               destination holds in its dedup ring, when that is smaller (1, the default; both \
               ends must allow it)",
        set: |c, v| {
            c.delta = flag(v)?;
            Ok(())
        },
        show: |c| if c.delta { "1" } else { "0" }.into(),
    },
    TransportOption {
        name: "context",
        uri: Some("context"),
        control: Some("context"),
        allowed: "auto, always or 0",
        help: "compress each channel's zstd frames as one stream, so that a frame refers to the \
               frames before it: auto (the default) while the link is under 200 Mbit/s and the \
               encoders idle, always, or 0 (never; both ends must allow it)",
        set: |c, v| {
            c.context = match v {
                "auto" => super::ContextUse::Auto,
                "always" => super::ContextUse::Always,
                "0" | "off" | "no" | "false" => super::ContextUse::Off,
                _ => return Err(()),
            };
            Ok(())
        },
        show: |c| c.context.as_str().into(),
    },
    TransportOption {
        name: "keep",
        uri: Some("keep"),
        control: Some("keep"),
        allowed: "0 or 1",
        help: "keep a copy of this guest's pages on both hosts, so that it migrating back later \
               sends only what the host lacks (1, the default; the agents' --keep-mb bounds it)",
        set: |c, v| {
            c.keep_copy = flag(v)?;
            Ok(())
        },
        show: |c| if c.keep_copy { "1" } else { "0" }.into(),
    },
    TransportOption {
        name: "max-channels",
        uri: Some("max-channels"),
        control: Some("max_channels"),
        allowed: "1..=64",
        help: "most channels (QEMU connections: the main one and one per multifd channel) a \
               migration may open; both ends must allow what QEMU opens, and each is counted \
               against session-memory at its window",
        set: |c, v| {
            c.max_channels = int(v, 1, 64)?;
            Ok(())
        },
        show: |c| c.max_channels.to_string(),
    },
    TransportOption {
        name: "session-memory",
        uri: Some("session-memory"),
        control: Some("session_memory"),
        allowed: super::budget::SESSION_MEMORY_RANGE,
        help: "memory one migration may take, MiB (or 512MiB, 2GiB): a destination grants \
               windows and dedup rings within it and refuses a session whose streams do not fit",
        set: |c, v| {
            c.session_memory = size(v, 1 << 20, 64, 64 << 10)? << 20;
            Ok(())
        },
        show: |c| (c.session_memory >> 20).to_string(),
    },
    TransportOption {
        name: "congestion",
        uri: Some("congestion"),
        control: Some("congestion"),
        allowed: "a kernel congestion control name such as bbr or cubic",
        help: "TCP congestion control of the streams (default: the kernel's)",
        set: |c, v| {
            if v.is_empty()
                || v.len() > 15
                || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(());
            }
            c.tuning.congestion = Some(v.to_string());
            Ok(())
        },
        show: |c| c.tuning.congestion.clone().unwrap_or_default(),
    },
    TransportOption {
        name: "socket-buffer-kb",
        uri: None,
        control: Some("socket_buffer_kb"),
        allowed: "4..=1048576 KiB",
        help: "SO_SNDBUF/SO_RCVBUF of the streams, KiB (or 4MiB ...; default: kernel autotuning)",
        set: |c, v| {
            let b = size(v, 1 << 10, 4, 1 << 20)? as usize * 1024;
            c.tuning.send_buffer = Some(b);
            c.tuning.recv_buffer = Some(b);
            Ok(())
        },
        show: |c| {
            c.tuning
                .send_buffer
                .map(|b| (b / 1024).to_string())
                .unwrap_or_default()
        },
    },
    TransportOption {
        name: "idle-timeout",
        uri: Some("idle-timeout"),
        control: Some("idle_timeout"),
        allowed: IDLE_TIMEOUT_RANGE,
        help: "time without a frame from the peer before a migration fails (seconds, or 90s, 2m)",
        set: |c, v| {
            c.idle_timeout = duration(v, Duration::from_secs(1), Duration::from_secs(3600))?;
            Ok(())
        },
        show: |c| match c.idle_timeout.subsec_millis() {
            0 => c.idle_timeout.as_secs().to_string(),
            _ => format!("{}ms", c.idle_timeout.as_millis()),
        },
    },
    TransportOption {
        name: "connect-timeout",
        uri: Some("connect-timeout"),
        control: Some("connect_timeout"),
        allowed: "1..=600 s",
        help: "time to wait for the destination to accept each stream (seconds, or 1500ms)",
        set: |c, v| {
            c.connect_timeout = duration(v, Duration::from_secs(1), Duration::from_secs(600))?;
            Ok(())
        },
        show: |c| match c.connect_timeout.subsec_millis() {
            0 => c.connect_timeout.as_secs().to_string(),
            _ => format!("{}ms", c.connect_timeout.as_millis()),
        },
    },
    TransportOption {
        name: "tls-dir",
        uri: Some("tls-dir"),
        control: None,
        allowed: "a directory holding ca-cert.pem, server-cert.pem, server-key.pem, \
                  client-cert.pem, client-key.pem",
        help: "TLS credentials in libvirt's layout",
        set: |c, v| {
            if v.is_empty() {
                return Err(());
            }
            c.tls.dir = v.into();
            Ok(())
        },
        show: |c| c.tls.dir.display().to_string(),
    },
    TransportOption {
        name: "tls-hostname",
        uri: Some("tls-hostname"),
        control: Some("tls_hostname"),
        allowed: "a DNS name or IP address",
        help: "name the destination's certificate must carry (default: the \
               destination's IP address, as an IP SAN)",
        set: |c, v| {
            rustls_pki_types::ServerName::try_from(v.to_string()).map_err(|_| ())?;
            c.tls.hostname = Some(v.to_string());
            Ok(())
        },
        show: |c| c.tls.hostname.clone().unwrap_or_default(),
    },
    TransportOption {
        name: "insecure",
        uri: Some("insecure"),
        control: None,
        allowed: "0 or 1",
        help: "clear text: no TLS, no peer authentication (guest RAM readable and \
               forgeable on the network; logged as a warning at start)",
        set: |c, v| {
            c.tls.insecure = flag(v)?;
            Ok(())
        },
        show: |c| if c.tls.insecure { "1" } else { "0" }.into(),
    },
    TransportOption {
        name: "link-sample-ms",
        uri: None,
        control: None,
        allowed: crate::adapt::SAMPLE_INTERVAL_RANGE,
        help: "interval of the link samples (RTT, capacity, loss, rates) the mode detector \
               and the ETA read, ms (or 1s)",
        set: |c, v| {
            let d = if v.bytes().all(|b| b.is_ascii_digit()) {
                Duration::from_millis(v.parse().map_err(|_| ())?)
            } else {
                duration(v, Duration::ZERO, Duration::from_secs(1))?
            };
            if d < Duration::from_millis(100) || d > Duration::from_secs(1) {
                return Err(());
            }
            c.adapt.sample_interval = d;
            Ok(())
        },
        show: |c| c.adapt.sample_interval.as_millis().to_string(),
    },
    TransportOption {
        name: "mode",
        uri: None,
        control: None,
        allowed: "auto, datacenter, hybrid, internet",
        help: "link mode: auto (detected from latency, capacity and loss; see \
               docs/adaptivity.md) or a fixed one. The mode picks defaults: raw frames \
               only on datacenter paths, BBR congestion control on internet paths \
               (unless --congestion is set)",
        set: |c, v| {
            c.adapt.mode.fixed = match v {
                "auto" => None,
                m => Some(m.parse().map_err(|_| ())?),
            };
            Ok(())
        },
        show: |c| match c.adapt.mode.fixed {
            None => "auto".into(),
            Some(m) => m.to_string(),
        },
    },
    TransportOption {
        name: "mode-dc-rtt-ms",
        uri: None,
        control: None,
        allowed: "0.01..=10000 ms",
        help: "latency under which a path is datacenter, ms",
        set: |c, v| {
            c.adapt.mode.dc_rtt_ms = float(v, 0.01, 10_000.0)?;
            Ok(())
        },
        show: |c| show_float(c.adapt.mode.dc_rtt_ms),
    },
    TransportOption {
        name: "mode-internet-rtt-ms",
        uri: None,
        control: None,
        allowed: "0.01..=10000 ms",
        help: "latency from which a path is internet, ms",
        set: |c, v| {
            c.adapt.mode.internet_rtt_ms = float(v, 0.01, 10_000.0)?;
            Ok(())
        },
        show: |c| show_float(c.adapt.mode.internet_rtt_ms),
    },
    TransportOption {
        name: "mode-dc-mbit",
        uri: None,
        control: None,
        allowed: "1..=1000000 Mbit/s",
        help: "path capacity from which a path is datacenter (below: internet), Mbit/s",
        set: |c, v| {
            c.adapt.mode.dc_mbit = float(v, 1.0, 1e6)?;
            Ok(())
        },
        show: |c| show_float(c.adapt.mode.dc_mbit),
    },
    TransportOption {
        name: "mode-dc-loss-pct",
        uri: None,
        control: None,
        allowed: "0..=100 %",
        help: "loss (lost / sent segments) up to which a path is datacenter, percent",
        set: |c, v| {
            c.adapt.mode.dc_loss = float(v, 0.0, 100.0)? / 100.0;
            Ok(())
        },
        show: |c| show_float(c.adapt.mode.dc_loss * 100.0),
    },
    TransportOption {
        name: "mode-internet-loss-pct",
        uri: None,
        control: None,
        allowed: "0..=100 %",
        help: "loss from which a path is internet, percent",
        set: |c, v| {
            c.adapt.mode.internet_loss = float(v, 0.0, 100.0)? / 100.0;
            Ok(())
        },
        show: |c| show_float(c.adapt.mode.internet_loss * 100.0),
    },
    TransportOption {
        name: "mode-hysteresis-pct",
        uri: None,
        control: None,
        allowed: "0..=90 %",
        help: "how far a threshold next to the current mode moves in its favour, percent",
        set: |c, v| {
            c.adapt.mode.hysteresis = float(v, 0.0, 90.0)? / 100.0;
            Ok(())
        },
        show: |c| show_float(c.adapt.mode.hysteresis * 100.0),
    },
    TransportOption {
        name: "mode-dwell",
        uri: None,
        control: None,
        allowed: "0..=600 s",
        help: "shortest time between two mode switches (seconds, or 1500ms)",
        set: |c, v| {
            c.adapt.mode.dwell = duration(v, Duration::ZERO, Duration::from_secs(600))?;
            Ok(())
        },
        show: |c| match c.adapt.mode.dwell.subsec_millis() {
            0 => c.adapt.mode.dwell.as_secs().to_string(),
            _ => format!("{}ms", c.adapt.mode.dwell.as_millis()),
        },
    },
    TransportOption {
        name: "mode-confidence-pct",
        uri: None,
        control: None,
        allowed: "1..=100 %",
        help: "share of the last 1.5 s of samples that must agree on a new mode, percent",
        set: |c, v| {
            c.adapt.mode.confidence = float(v, 1.0, 100.0)? / 100.0;
            Ok(())
        },
        show: |c| show_float(c.adapt.mode.confidence * 100.0),
    },
];

/// The option named `name` on `surface`.
pub fn find(name: &str, surface: Surface) -> Option<&'static TransportOption> {
    OPTIONS.iter().find(|o| match surface {
        Surface::Cli => o.name == name,
        Surface::Uri => o.uri == Some(name),
        Surface::Control => o.control == Some(name),
    })
}

/// The names `surface` knows, for "unknown option" messages.
pub fn names(surface: Surface) -> Vec<&'static str> {
    OPTIONS
        .iter()
        .filter_map(|o| match surface {
            Surface::Cli => Some(o.name),
            Surface::Uri => o.uri,
            Surface::Control => o.control,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, v: &str, s: Surface) -> Result<TransportConfig, String> {
        let mut c = TransportConfig::default();
        find(name, s)
            .ok_or_else(|| format!("no option {name}"))?
            .apply(&mut c, v, s)
            .map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn every_surface_names_option_and_range_alike() {
        assert_eq!(
            set("streams", "0", Surface::Cli).unwrap_err(),
            "--streams = 0 is out of range: 1..=256"
        );
        assert_eq!(
            set("streams", "300", Surface::Uri).unwrap_err(),
            "streams = 300 is out of range: 1..=256"
        );
        assert_eq!(
            set("window_mb", "0", Surface::Control).unwrap_err(),
            "window_mb = 0 is out of range: 1..=256 MiB"
        );
        assert_eq!(
            set("window", "x", Surface::Uri).unwrap_err(),
            "window = x is out of range: 1..=256 MiB"
        );
        let e = set("codec", "zstd:99", Surface::Uri).unwrap_err();
        assert!(
            e.starts_with("codec = zstd:99 is out of range: auto, raw"),
            "{e}"
        );
        assert!(set("congestion", "bbr;rm", Surface::Cli).is_err());
    }

    #[test]
    fn values_land_in_the_config() {
        let c = set("window", "2", Surface::Uri).unwrap();
        assert_eq!(c.window, 2 << 20);
        let c = set("dedup_cache_mb", "0", Surface::Control).unwrap();
        assert_eq!(c.dedup_cache_mb, 0);
        let c = set("codec", "zstd:3", Surface::Cli).unwrap();
        assert_eq!(c.codec_name(), "zstd:3");
        let c = set("idle-timeout", "30", Surface::Cli).unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        let c = set("socket-buffer-kb", "512", Surface::Cli).unwrap();
        assert_eq!(c.tuning.recv_buffer, Some(512 << 10));
    }

    #[test]
    fn sizes_and_durations_take_units() {
        let c = set("window-mb", "64MiB", Surface::Cli).unwrap();
        assert_eq!(c.window, 64 << 20);
        let c = set("dedup-cache-mb", "1GiB", Surface::Cli).unwrap();
        assert_eq!(c.dedup_cache_mb, 1024);
        let c = set("socket-buffer-kb", "4M", Surface::Cli).unwrap();
        assert_eq!(c.tuning.send_buffer, Some(4 << 20));
        let c = set("idle-timeout", "2m", Surface::Cli).unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        let c = set("session-memory", "256MiB", Surface::Cli).unwrap();
        assert_eq!(c.session_memory, 256 << 20);
        let c = set("session-memory", "2GiB", Surface::Uri).unwrap();
        assert_eq!(c.session_memory, 2 << 30);
        let c = set("session_memory", "64", Surface::Control).unwrap();
        assert_eq!(c.session_memory, 64 << 20);
        assert_eq!(
            set("session-memory", "8MiB", Surface::Cli).unwrap_err(),
            format!(
                "--session-memory = 8MiB is out of range: {}",
                crate::transport::budget::SESSION_MEMORY_RANGE
            )
        );
        let c = set("connect-timeout", "1500ms", Surface::Cli).unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        for (name, v) in [
            ("window-mb", "512KiB"), // not a whole MiB
            ("window-mb", "1GiB"),   // over 256 MiB
            ("idle-timeout", "500ms"),
            ("idle-timeout", "5h"),
            ("dedup-cache-mb", "5TiB"),
        ] {
            assert!(set(name, v, Surface::Cli).is_err(), "{name} {v}");
        }
    }

    #[test]
    fn adaptive_options_land_in_the_config() {
        let c = set("mode", "internet", Surface::Cli).unwrap();
        assert_eq!(c.adapt.mode.fixed, Some(crate::adapt::LinkMode::Internet));
        let c = set("mode-dc-loss-pct", "0.05%", Surface::Cli).unwrap();
        assert!((c.adapt.mode.dc_loss - 0.0005).abs() < 1e-12);
        let c = set("link-sample-ms", "250", Surface::Cli).unwrap();
        assert_eq!(c.adapt.sample_interval, Duration::from_millis(250));
        let c = set("link-sample-ms", "1s", Surface::Cli).unwrap();
        assert_eq!(c.adapt.sample_interval, Duration::from_secs(1));
        let c = set("mode-dwell", "1500ms", Surface::Cli).unwrap();
        assert_eq!(c.adapt.mode.dwell, Duration::from_millis(1500));
        for (name, v) in [
            ("mode", "lan"),
            ("link-sample-ms", "50"),
            ("link-sample-ms", "2s"),
            ("mode-confidence-pct", "0"),
            ("mode-dc-rtt-ms", "NaN"),
            ("mode-hysteresis-pct", "95"),
        ] {
            assert!(set(name, v, Surface::Cli).is_err(), "{name} {v}");
        }
        // out of order: the config check names the options
        let c = set("mode-dc-rtt-ms", "80", Surface::Cli).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("mode-dc-rtt-ms"), "{e}");
    }

    #[test]
    fn show_round_trips_through_apply() {
        let d = TransportConfig::default();
        for o in OPTIONS {
            let v = o.show(&d);
            if v.is_empty() {
                continue; // unset (kernel default)
            }
            let mut c = TransportConfig::default();
            o.apply(&mut c, &v, Surface::Cli).unwrap();
            assert_eq!(o.show(&c), v, "{}", o.name);
        }
    }

    #[test]
    fn names_are_unique_per_surface() {
        for s in [Surface::Cli, Surface::Uri, Surface::Control] {
            let mut n = names(s);
            let len = n.len();
            n.sort();
            n.dedup();
            assert_eq!(n.len(), len, "{s:?}");
        }
    }
}
