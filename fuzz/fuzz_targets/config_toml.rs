//! The agent's configuration file (`/etc/dwcp/dwcp.toml`): `FileConfig::parse`
//! of the `dwcp` binary crate, compiled in from dwcp/src/config.rs (a binary
//! crate's module cannot be imported). A file that parses must apply.
#![no_main]

#[allow(dead_code)]
#[path = "../../dwcp/src/config.rs"]
mod config;

use dwcp_core::transport::TransportConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::FileConfig::parse(text) {
        Ok(cfg) => {
            let mut t = TransportConfig::default();
            cfg.apply_transport(&mut t)
                .expect("a configuration that parses applies");
        }
        Err(problems) => {
            for p in &problems {
                let _ = p.to_string();
            }
        }
    }
});
