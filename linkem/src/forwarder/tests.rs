use super::*;

fn dir(cfg: DirConfig) -> Box<Direction> {
    let lc = LinkConfig {
        ring_slots: 64,
        ..LinkConfig::default()
    };
    Direction::new(&lc, cfg, 7, 0)
}

fn push(d: &mut Direction, arr: u64, wire: u32) {
    let i = (d.tail % d.n as u64) as usize;
    d.meta[i] = Meta {
        len: wire,
        wire,
        arr,
        out: 0,
    };
    if d.shaped {
        d.backlog += wire as u64;
    }
    d.tail += 1;
}

#[test]
fn serializer_paces_at_rate_then_delays() {
    // 8 Mbit/s = 1 byte per microsecond.
    let mut d = dir(DirConfig {
        rate_bps: Some(8_000_000),
        delay: Duration::from_millis(10),
        ..Default::default()
    });
    for _ in 0..3 {
        push(&mut d, 1_000_000, 1000);
    }
    d.serialize(u64::MAX);
    let outs: Vec<u64> = d.meta[..3].iter().map(|m| m.out).collect();
    assert_eq!(outs, vec![12_000_000, 13_000_000, 14_000_000]);
    assert_eq!(d.backlog, 0);
}

#[test]
fn serializer_waits_for_horizon() {
    let mut d = dir(DirConfig {
        rate_bps: Some(8_000_000),
        ..Default::default()
    });
    push(&mut d, 0, 1000);
    push(&mut d, 0, 1000);
    d.serialize(500_000); // second frame starts at 1 ms: not yet
    assert_eq!(d.ser, 1);
    assert_eq!(d.backlog, 1000);
    d.serialize(1_000_000);
    assert_eq!(d.ser, 2);
}

#[test]
fn jitter_is_bounded_and_keeps_order() {
    let mut d = dir(DirConfig {
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(4),
        ..Default::default()
    });
    for k in 0..60u64 {
        push(&mut d, k * 100_000, 100);
    }
    d.serialize(u64::MAX);
    let mut last = 0;
    for k in 0..60usize {
        let m = d.meta[k];
        assert!(m.out >= last, "reordered");
        last = m.out;
        // never earlier than delay - jitter; later only by the clamp
        assert!(m.out >= m.arr + 1_000_000);
    }
    let spread: Vec<i64> = (0..60)
        .map(|k| d.meta[k].out as i64 - d.meta[k].arr as i64)
        .collect();
    assert!(spread.iter().max().unwrap() - spread.iter().min().unwrap() > 2_000_000);
}

#[test]
fn trace_rate_applies_to_frames_starting_after_change() {
    let tr = Arc::new(crate::config::Trace::from_steps(&[(0.0, 8.0), (1.0, 16.0)]).unwrap());
    let mut d = dir(DirConfig {
        trace: Some(tr),
        ..Default::default()
    });
    push(&mut d, 0, 1000); // 8 Mbit/s: 1 ms
    push(&mut d, 1_000_000_000, 1000); // 16 Mbit/s: 0.5 ms
    d.serialize(u64::MAX);
    assert_eq!(d.meta[0].out, 1_000_000);
    assert_eq!(d.meta[1].out, 1_000_500_000);
}

#[test]
fn stats_json_shape() {
    let j = Stats::default().to_json();
    assert!(j.starts_with("{\"a_to_b\":{\"rx_packets\":0,"));
    assert!(j.contains("\"b_to_a\":{"));
}
