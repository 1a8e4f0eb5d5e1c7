//! Where the lab finds its files, at run time: the test guest's scripts
//! (`guest/build.sh` and its sources), the guest they build (kernel, initrd,
//! the host copy of the workload) and the `dwcp` binary. Nothing here is
//! fixed at compile time, so a `dwcp` built in one checkout runs anywhere.
//!
//! The data directory holds `guest/build.sh`; it is, first found wins:
//!
//! 1. `--data-dir DIR` ([`set_data_dir`]) or `$DWCP_DATA_DIR`: `DIR` itself
//!    or, for a source checkout, `DIR/tests`;
//! 2. the installed layout, `<dir of the executable>/../share/dwcp`;
//! 3. a build tree: `tests/` of the first directory above the executable's
//!    (`target/release/dwcp` in a checkout) that has `tests/guest/build.sh`;
//! 4. the same above the current directory (`cargo test` runs tests from the
//!    package directory; a shared `CARGO_TARGET_DIR` lies outside the tree).
//!
//! The guest is built into `<data dir>/guest/out` (`tests/guest/out` in a
//! build tree), or into `$DWCP_GUEST_OUT` when set (`$DWCP_GUEST_DIR`, its
//! older name, is still read); prebuilt files there need no scripts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};

/// Environment variable naming the data directory.
pub const DATA_DIR_ENV: &str = "DWCP_DATA_DIR";
/// Environment variable naming the guest's output directory.
pub const GUEST_OUT_ENV: &str = "DWCP_GUEST_OUT";
/// The guest build script, relative to a data directory.
pub const GUEST_SCRIPT: &str = "guest/build.sh";
/// The data directory of an installation, relative to the executable's
/// directory.
pub const INSTALLED: &str = "../share/dwcp";

static DATA_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Sets the data directory for this process (`--data-dir`); it wins over
/// `$DWCP_DATA_DIR`. Only the first call counts.
pub fn set_data_dir(dir: PathBuf) {
    let _ = DATA_DIR.set(dir);
}

/// `--data-dir` of the commands that run the test guest.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DataDirArgs {
    /// Directory with the test guest's scripts (guest/build.sh): an
    /// installed share/dwcp or a dwcp source checkout. Default: the
    /// installation (<exe dir>/../share/dwcp), else a source checkout above
    /// the executable (target/release/dwcp) or the current directory.
    #[arg(long, global = true, env = "DWCP_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DataDirArgs {
    /// Makes `--data-dir` the process's data directory ([`set_data_dir`]).
    pub fn apply(&self) {
        if let Some(d) = &self.data_dir {
            set_data_dir(d.clone());
        }
    }
}

/// How a [`DataDir`] was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// `--data-dir`.
    Option,
    /// `$DWCP_DATA_DIR`.
    Env,
    /// `<exe dir>/../share/dwcp`.
    Installed,
    /// `tests/` of a source checkout above the executable or the current
    /// directory.
    BuildTree,
}

/// The directory holding the test guest's scripts.
#[derive(Debug, Clone)]
pub struct DataDir {
    /// The directory with `guest/build.sh`.
    pub root: PathBuf,
    pub found: Found,
}

impl DataDir {
    /// Finds the data directory (see the module documentation for the order).
    pub fn locate() -> Result<DataDir> {
        let given = DATA_DIR
            .get()
            .map(|d| (d.clone(), Found::Option, "--data-dir (or $DWCP_DATA_DIR)"))
            .or_else(|| {
                std::env::var_os(DATA_DIR_ENV)
                    .filter(|v| !v.is_empty())
                    .map(|d| (PathBuf::from(d), Found::Env, DATA_DIR_ENV))
            });
        if let Some((dir, found, name)) = given {
            return match given_root(&dir) {
                Some(root) => Ok(DataDir { root, found }),
                None => bail!(
                    "{name} {}: neither {} nor {} exists",
                    dir.display(),
                    dir.join(GUEST_SCRIPT).display(),
                    dir.join("tests").join(GUEST_SCRIPT).display()
                ),
            };
        }
        let exe_dir = exe_dir();
        if let Some(d) = &exe_dir {
            let root = d.join(INSTALLED);
            if root.join(GUEST_SCRIPT).is_file() {
                return Ok(DataDir {
                    root,
                    found: Found::Installed,
                });
            }
        }
        if let Some(tree) = build_tree() {
            return Ok(DataDir {
                root: tree.join("tests"),
                found: Found::BuildTree,
            });
        }
        let exe = exe_dir
            .as_deref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "<executable's directory>".into());
        let cwd = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| "<current directory>".into());
        Err(anyhow!(
            "the test guest's scripts were not found: looked for {GUEST_SCRIPT} in \
             {exe}/{INSTALLED} and for tests/{GUEST_SCRIPT} in the directories above {exe} \
             and above {cwd}; pass --data-dir DIR or set {DATA_DIR_ENV}=DIR, DIR being \
             an installed share/dwcp or a dwcp source checkout"
        ))
    }

    /// `guest/build.sh`.
    pub fn guest_script(&self) -> PathBuf {
        self.root.join(GUEST_SCRIPT)
    }

    /// Where the guest is built when `$DWCP_GUEST_OUT` is not set.
    pub fn default_guest_out(&self) -> PathBuf {
        self.root.join("guest/out")
    }
}

/// `dir` given by the user: a data directory, or a checkout holding one in
/// `tests/`.
fn given_root(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("tests")]
        .into_iter()
        .find(|d| d.join(GUEST_SCRIPT).is_file())
}

fn exe_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let exe = exe.canonicalize().unwrap_or(exe);
    exe.parent().map(Path::to_path_buf)
}

/// The source checkout this process runs from, if any: the first directory
/// holding `tests/guest/build.sh` above the executable's directory, else
/// above the current directory.
pub fn build_tree() -> Option<PathBuf> {
    let has = |d: &Path| d.join("tests").join(GUEST_SCRIPT).is_file();
    let above = |start: Option<PathBuf>| -> Option<PathBuf> {
        start?.ancestors().find(|d| has(d)).map(Path::to_path_buf)
    };
    above(exe_dir()).or_else(|| above(std::env::current_dir().ok()))
}

fn guest_out_env() -> Option<PathBuf> {
    [GUEST_OUT_ENV, "DWCP_GUEST_DIR"]
        .iter()
        .filter_map(std::env::var_os)
        .find(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The directory the guest is built into: `$DWCP_GUEST_OUT`, else
/// `guest/out` of the data directory.
pub fn guest_out() -> Result<PathBuf> {
    match guest_out_env() {
        Some(d) => Ok(d),
        None => Ok(DataDir::locate()?.default_guest_out()),
    }
}

/// The test guest's build outputs (kernel, initramfs, host copy of the
/// workload), built with `guest/build.sh` when one is missing; returns the
/// directory holding them.
pub fn built_guest() -> Result<PathBuf> {
    let out = guest_out()?;
    let outputs = ["vmlinuz", "initrd.img", "dwcp-workload"];
    if outputs.iter().all(|f| out.join(f).exists()) {
        return Ok(out);
    }
    let data = DataDir::locate()?;
    let script = data.guest_script();
    let st = Command::new("bash").arg(&script).arg(&out).status();
    if !st.is_ok_and(|s| s.success()) || !outputs.iter().all(|f| out.join(f).exists()) {
        bail!(
            "test guest missing in {} and {} failed (run `make setup`)",
            out.display(),
            script.display()
        );
    }
    Ok(out)
}

/// Kernel and initramfs of the test guest (built by `guest/build.sh`).
pub fn guest_files() -> Result<(PathBuf, PathBuf)> {
    let out = built_guest()?;
    Ok((out.join("vmlinuz"), out.join("initrd.img")))
}

/// The host copy of the guest's workload (`--dump`, `--selftest`).
pub fn workload_tool() -> Result<PathBuf> {
    Ok(built_guest()?.join("dwcp-workload"))
}

/// The `dwcp` binary: `$DWCP_BIN`; this process when it is `dwcp` (demo,
/// benchmark); else the newest `dwcp` of `{release,debug}` in
/// `$CARGO_TARGET_DIR`, in `target/` of the build tree, or next to the
/// profile directory this executable runs from (`target/debug/deps/..`).
pub fn dwcp_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("DWCP_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "dwcp") {
            return Ok(exe);
        }
    }
    let mut targets: Vec<PathBuf> = Vec::new();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => targets.push(PathBuf::from(t)),
        None => targets.extend(build_tree().map(|t| t.join("target"))),
    }
    // A test binary runs from <target>/<profile>/deps.
    if let Some(d) = exe_dir() {
        if d.file_name().is_some_and(|n| n == "deps") {
            targets.extend(d.parent().and_then(Path::parent).map(Path::to_path_buf));
        }
    }
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = targets
        .iter()
        .flat_map(|t| ["release", "debug"].map(|p| t.join(p).join("dwcp")))
        .filter_map(|p| p.metadata().and_then(|m| m.modified()).ok().map(|t| (t, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        let looked: Vec<String> = targets.iter().map(|t| t.display().to_string()).collect();
        anyhow!(
            "no dwcp binary in {}: run `cargo build --release -p dwcp` (or set DWCP_BIN)",
            if looked.is_empty() {
                "a target directory (none found)".to_string()
            } else {
                looked.join(", ")
            }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_dir_is_a_data_dir_or_a_checkout() {
        let base = std::env::temp_dir().join(format!("dwcp-locate-{}", std::process::id()));
        let data = base.join("share/dwcp");
        let checkout = base.join("src");
        for d in [&data, &checkout.join("tests")] {
            std::fs::create_dir_all(d.join("guest")).unwrap();
            std::fs::write(d.join(GUEST_SCRIPT), "#!/bin/sh\n").unwrap();
        }
        assert_eq!(given_root(&data), Some(data.clone()));
        assert_eq!(given_root(&checkout), Some(checkout.join("tests")));
        assert_eq!(given_root(&base), None);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn this_checkout_is_found_from_the_test_binary() {
        // cargo runs unit tests from the package directory, inside the tree.
        let tree = build_tree().expect("a build tree above the test");
        assert!(tree.join("tests").join(GUEST_SCRIPT).is_file());
    }
}
