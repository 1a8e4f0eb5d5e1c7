//! Stand-alone `linkem` command (the same as `dwcp linkem ...`).
fn main() {
    if let Err(e) = linkem::cli_main(std::env::args().skip(1)) {
        eprintln!("linkem: {e:#}");
        std::process::exit(1);
    }
}
