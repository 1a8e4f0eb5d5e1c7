//! What a process holds, read from `/proc` (resident memory, open file
//! descriptors, threads), and the least-squares slope that tells growth from
//! noise over a series of such samples.

use std::path::Path;

use anyhow::{Context, Result};

/// One look at a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// Resident set size (`VmRSS`), bytes.
    pub rss: u64,
    /// Peak resident set size (`VmHWM`), bytes.
    pub hwm: u64,
    /// Open file descriptors (entries of `/proc/PID/fd`).
    pub fds: u64,
    /// Threads (`Threads`).
    pub threads: u64,
}

/// Reads `pid`'s [`ProcSample`]; fails naming the file when the process
/// is gone.
pub fn proc_sample(pid: u32) -> Result<ProcSample> {
    let status_path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
    let fd_dir = format!("/proc/{pid}/fd");
    let fds = std::fs::read_dir(Path::new(&fd_dir))
        .with_context(|| format!("listing {fd_dir}"))?
        .count() as u64;
    Ok(ProcSample {
        rss: status_field(&status, "VmRSS:").unwrap_or(0) * 1024,
        hwm: status_field(&status, "VmHWM:").unwrap_or(0) * 1024,
        fds,
        threads: status_field(&status, "Threads:").unwrap_or(0),
    })
}

/// The number after `name` in a `/proc/PID/status` text (kB for the `Vm*`
/// fields).
fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The least-squares slope of `ys` over their index (0, 1, 2, ...): how
/// much a quantity grows per sample. 0 for fewer than two samples.
pub fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
    }
    sxy / sxx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_lines_and_noise() {
        assert_eq!(slope(&[]), 0.0);
        assert_eq!(slope(&[5.0]), 0.0);
        assert!((slope(&[1.0, 3.0, 5.0, 7.0]) - 2.0).abs() < 1e-9);
        assert!(slope(&[4.0, 4.0, 4.0]).abs() < 1e-9);
        // Alternating noise around a flat level has no trend.
        assert!(slope(&[1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0]).abs() < 0.2);
        assert!((slope(&[10.0, 8.0, 6.0]) + 2.0).abs() < 1e-9);
    }

    #[test]
    fn this_process_has_memory_files_and_a_thread() {
        let s = proc_sample(std::process::id()).unwrap();
        assert!(s.rss > 0 && s.hwm >= s.rss, "{s:?}");
        assert!(s.fds >= 3 && s.threads >= 1, "{s:?}");
        assert!(proc_sample(u32::MAX)
            .unwrap_err()
            .to_string()
            .contains("/proc/4294967295/status"));
    }

    #[test]
    fn status_fields() {
        let t = "Name:\tdwcp\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t7\n";
        assert_eq!(status_field(t, "VmRSS:"), Some(1024));
        assert_eq!(status_field(t, "Threads:"), Some(7));
        assert_eq!(status_field(t, "VmSwap:"), None);
    }
}
