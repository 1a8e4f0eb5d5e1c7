//! linkem's parsers: bandwidth trace files (`Trace::parse`, then `rate_at`)
//! and the CLI values `parse_duration`, `parse_rate`, `parse_loss`,
//! `parse_queue`. Byte 0 picks the parser, the rest is the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use linkem::config::{parse_duration, parse_loss, parse_queue, parse_rate, Trace};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 5 {
        0 => {
            if let Ok(t) = Trace::parse(s) {
                let p = t.period();
                assert!(p > 0.0, "trace period {p}");
                for at in [0.0, 0.5, 1.0, 1e3, 1e9, -1.0, p, p * 0.999] {
                    let r = t.rate_at(at);
                    assert!(r.is_finite() && r >= 0.0, "rate {r} at {at}");
                }
            }
        }
        1 => {
            let _ = parse_duration(s);
        }
        2 => {
            if let Ok(r) = parse_rate(s) {
                assert!(r > 0, "rate {s:?} parsed to 0 bit/s");
            }
        }
        3 => {
            if let Ok(l) = parse_loss(s) {
                assert!((0.0..=1.0).contains(&l));
            }
        }
        _ => {
            let _ = parse_queue(s);
        }
    }
});
