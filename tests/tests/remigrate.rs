//! Re-migration (docs/hde.md, layer 3) on real parts: the test guest
//! migrates from the lab's source host to its destination host and back
//! (same name, real QEMU and agents, TLS). On the way back the first
//! source announces the pages it kept from the first trip, and the guest's
//! unchanged pages go as references to them. Both trips: the destination's
//! RAM equals the source's page by page and the guest keeps running.

use dwcp_lab::*;

#[test]
fn a_guest_migrated_back_sends_what_the_host_lacks_ram_verified() {
    let lab = Lab::new("remig", Middle::Bridge, &[]).expect("lab");
    let spec = GuestSpec::default();
    let there = MigrationSpec {
        name: "remig-vm".into(),
        ..Default::default()
    };
    let scratch = scratch_dir(&lab).unwrap();
    let logs = |lab: &Lab| {
        format!(
            "source agent log:\n{}\ndestination agent log:\n{}",
            lab.src_agent().log_text(),
            lab.dst_agent().log_text()
        )
    };
    let pair = boot_pair(&lab, &spec, &there).expect("boot guests");
    let r = dwcp_migrate(&lab, &pair, &there).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));
    assert_eq!(r["status"], "completed", "{r}");
    let v = verify(&pair, r, &scratch).expect("verification, first trip");
    assert_eq!(v.memory.differing_pages, 0);
    let first = v.result;
    assert_eq!(first["session"]["pages_kept"], 0, "nothing kept yet");

    // Back, under the same name: the guest runs where it went.
    let back = MigrationSpec {
        reverse: true,
        ..there.clone()
    };
    let dst = start_incoming(&lab, "back", &spec, &back).expect("incoming QEMU on the source host");
    let pair = pair.turned_around(dst);
    let r = dwcp_migrate(&lab, &pair, &back).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));
    assert_eq!(r["status"], "completed", "{r}");
    let v = verify(&pair, r, &scratch).expect("verification, way back");
    assert_eq!(v.memory.differing_pages, 0);
    let second = v.result;
    let wire = |r: &serde_json::Value| r["wire_bytes"].as_u64().unwrap_or(0);
    let kept = second["session"]["pages_kept"].as_u64().unwrap_or(0);
    eprintln!(
        "first trip: wire {} B, {} pages seen; back: wire {} B, {} pages seen, {kept} as references to the kept copy",
        wire(&first),
        first["session"]["pages_seen"],
        wire(&second),
        second["session"]["pages_seen"]
    );
    assert!(
        kept > 1000,
        "no page went as a reference: {}",
        second["session"]
    );
    assert!(
        wire(&second) * 2 < wire(&first),
        "the way back cost {} B against {} B",
        wire(&second),
        wire(&first)
    );
    let src_log = lab.src_agent().log_text();
    assert!(
        src_log.contains("announcing the pages kept"),
        "the first source announced its copy:\n{src_log}"
    );
}
