//! `dwcp:` URIs as QEMU hands them to libdwcp (`dwcp::uri::DwcpUri::parse`,
//! what `dwcp_uri_parse` and the channel constructors call). No resolving.
#![no_main]

use dwcp::uri::DwcpUri;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(u) = DwcpUri::parse(s) else {
        return;
    };
    assert!(!u.host.is_empty());
    assert!(dwcp_core::wire::check_name(&u.name).is_ok());
    assert!(u.cfg.validate().is_ok());
});
