//! End-to-end: the test guest live-migrates between two network-namespace
//! hosts through a pair of `dwcp agent`s; the destination's RAM must equal the
//! source's and the guest must keep running (and checking its own data) on
//! the destination. Needs root (namespaces) and QEMU 10.0 (`make setup`).

use dwcp_lab::{
    boot_pair, dwcp_migrate, guest_files, scratch_dir, verify, GuestSpec, Lab, Middle,
    MigrationSpec,
};

fn migrate_and_verify(tag: &str, spec: GuestSpec, mig: MigrationSpec) {
    let lab = Lab::new(tag, Middle::Bridge, &[]).expect("lab");
    let pair = boot_pair(&lab, &spec, &mig).expect("boot guests");
    let r = match dwcp_migrate(&lab, &pair, &mig) {
        Ok(r) => r,
        Err(e) => panic!(
            "{e:#}\nsource agent log:\n{}\ndestination agent log:\n{}",
            lab.src_agent().log_text(),
            lab.dst_agent().log_text()
        ),
    };
    assert_eq!(r["status"], "completed", "{r}");
    let v = verify(&pair, r, &scratch_dir(&lab).unwrap()).expect("verification");
    assert_eq!(v.memory.differing_pages, 0);
    let s = &v.result["session"];
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(s["streams"].as_u64(), Some(mig.streams as u64));
    let channels = s["channels"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(
        channels,
        1 + mig.multifd.unwrap_or(0) as usize,
        "channels relayed: {s}"
    );
    // The planner found the guest's pages, on QEMU's multifd channels too
    // (QEMU's multifd packets followed: dwcp-core/src/codec/multifd.rs).
    if mig.codec.starts_with("zstd") {
        assert!(
            s["pages_seen"].as_u64().unwrap_or(0) > spec.fill_mb << 7,
            "pages found: {s}"
        );
        eprintln!(
            "{tag}: pages seen {}, sent as references {} (to another channel's copy {}), as deltas {}",
            s["pages_seen"], s["pages_deduped"], s["pages_xref"], s["pages_delta"]
        );
        // Content one multifd channel sent, another sent again as a
        // reference to the first one's copy (docs/hde.md).
        if mig.multifd.is_some() {
            assert!(
                s["pages_xref"].as_u64().unwrap_or(0) > 0,
                "no cross-channel reference: {s}"
            );
        }
    }
    // Everything QEMU sent arrived on the other side.
    assert!(
        v.result["qemu_bytes"].as_u64().unwrap() > spec.fill_mb << 19,
        "{}",
        v.result
    );
    // The link mode the source detected, and the ETA's error afterwards:
    // the ETA shown at 25/50/75 % of the migration against what remained.
    let r = &v.result;
    assert!(r["mode"].is_string(), "a link mode: {r}");
    assert!(s["adapt"]["link"]["rtt_us"].as_u64().is_some(), "{s}");
    let eta = &r["eta"];
    assert!(eta["actual_s"].as_f64().unwrap_or(0.0) > 0.0, "{eta}");
    assert_eq!(eta["checks"].as_array().map(Vec::len), Some(3), "{eta}");
    eprintln!(
        "{tag}: link mode {} ({} switches), ETA error at 25/50/75 %: {} % (ETA source {})",
        r["mode"],
        r["mode_switches"],
        eta["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| match c["error_pct"].as_f64() {
                Some(e) => format!("{e:+.0}"),
                None => "?".into(),
            })
            .collect::<Vec<_>>()
            .join(" / "),
        eta["checks"][1]["source"]
    );
    eprintln!(
        "{tag}: total {} ms, downtime {} ms, QEMU bytes {}, wire bytes {}, ratio {:.2}, guest pause {} ms",
        v.result["total_time_ms"],
        v.result["downtime_ms"],
        v.result["qemu_bytes"],
        v.result["wire_bytes"],
        v.result["ratio"].as_f64().unwrap_or(0.0),
        v.pause_ms
    );
}

#[test]
fn one_stream_no_compression() {
    migrate_and_verify(
        "s1none",
        GuestSpec::default(),
        MigrationSpec {
            streams: 1,
            codec: "none".into(),
            extra: vec!["--dedup-cache-mb".into(), "0".into()],
            ..Default::default()
        },
    );
}

#[test]
fn eight_streams_lz4() {
    migrate_and_verify(
        "s8lz4",
        GuestSpec::default(),
        MigrationSpec {
            streams: 8,
            codec: "lz4".into(),
            ..Default::default()
        },
    );
}

#[test]
fn four_streams_zstd() {
    migrate_and_verify(
        "s4zstd",
        GuestSpec::default(),
        MigrationSpec {
            streams: 4,
            codec: "zstd:3".into(),
            ..Default::default()
        },
    );
}

#[test]
fn multifd_four_channels() {
    migrate_and_verify(
        "mfd4",
        GuestSpec::default(),
        MigrationSpec {
            streams: 4,
            // zstd: planned frames (lz4 on a bridge goes raw, unplanned).
            codec: "zstd:3".into(),
            multifd: Some(4),
            ..Default::default()
        },
    );
}

#[test]
fn guest_dirtying_memory_during_migration() {
    migrate_and_verify(
        "dirty",
        GuestSpec {
            dirty_mbps: 32,
            ..GuestSpec::default()
        },
        MigrationSpec {
            streams: 4,
            codec: "lz4".into(),
            ..Default::default()
        },
    );
}

#[test]
fn auto_codec_with_a_dirtying_guest() {
    // On this datacenter-like bridge auto starts raw; the tier may change
    // frame by frame (raw / lz4 / zstd:1 / zstd:3) and the destination must
    // still rebuild every byte.
    migrate_and_verify(
        "auto",
        GuestSpec {
            dirty_mbps: 16,
            ..GuestSpec::default()
        },
        MigrationSpec {
            streams: 2,
            codec: "auto".into(),
            ..Default::default()
        },
    );
}

/// `dwcp benchmark compare --qemu-args-file`'s path: a guest given as plain
/// QEMU arguments (here the test kernel, as a user would pass their own),
/// no heartbeat to wait for; RAM still compared page by page and the guest
/// must run on at the destination.
#[test]
fn a_guest_of_your_own_given_as_qemu_arguments() {
    let (kernel, initrd) = guest_files().expect("test guest");
    let spec = GuestSpec::default();
    let args: Vec<String> = [
        "-machine",
        "pc",
        "-m",
        "256",
        "-accel",
        spec.accel.as_str(),
        "-cpu",
        "qemu64",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        &kernel.display().to_string(),
        "-initrd",
        &initrd.display().to_string(),
        "-append",
        "console=ttyS0 panic=-1 quiet dwcp.fill=96 dwcp.dirty=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    migrate_and_verify(
        "own",
        GuestSpec {
            qemu_args: args,
            warmup_s: 12,
            ..spec
        },
        MigrationSpec::default(),
    );
}
