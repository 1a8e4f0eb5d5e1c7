//! `dwcp generate-docs` (hidden): man pages and shell completions generated
//! from the clap definition of the CLI, for `make install` and the Debian
//! packages. Nothing here depends on the build machine: the pages carry no
//! path, and their date is `SOURCE_DATE_EPOCH` when set (the Makefile sets it
//! to the last commit's time), so two builds of one commit give the same files.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Args, Debug)]
pub struct GenDocsArgs {
    /// Write dwcp.1 and one page per subcommand (dwcp-agent.1, ...) here.
    #[arg(long, value_name = "DIR")]
    man: Option<PathBuf>,
    /// Write the bash (dwcp), zsh (_dwcp) and fish (dwcp.fish) completions here.
    #[arg(long, value_name = "DIR")]
    completions: Option<PathBuf>,
}

pub fn run(a: GenDocsArgs) -> Result<()> {
    if a.man.is_none() && a.completions.is_none() {
        anyhow::bail!("nothing to do: give --man DIR and/or --completions DIR");
    }
    let mut cmd = crate::Cli::command();
    cmd.build();
    if let Some(dir) = &a.man {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let version = cmd.get_version().unwrap_or_default().to_string();
        let n = man_pages(&cmd, dir, &version, &page_date())?;
        eprintln!("generate-docs: {n} man pages in {}", dir.display());
    }
    if let Some(dir) = &a.completions {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // File names as the shells look them up in their completion directories.
        for (shell, file) in [
            (Shell::Bash, "dwcp"),
            (Shell::Zsh, "_dwcp"),
            (Shell::Fish, "dwcp.fish"),
        ] {
            let path = dir.join(file);
            let mut out =
                fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            clap_complete::generate(shell, &mut cmd, "dwcp", &mut out);
        }
        eprintln!(
            "generate-docs: bash, zsh and fish completions in {}",
            dir.display()
        );
    }
    Ok(())
}

/// One page for `cmd` and, recursively, for each of its visible subcommands
/// (named `dwcp-agent.1`, `dwcp-cluster-status.1`, ...). Returns the count.
fn man_pages(cmd: &clap::Command, dir: &Path, version: &str, date: &str) -> Result<usize> {
    let mut n = 0;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        n += man_pages(sub, dir, version, date)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .date(date)
        .source(format!("dwcp {version}"))
        .manual("DWCP Manual");
    let path = dir.join(man.get_filename());
    let mut out =
        fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    man.render(&mut out)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(n + 1)
}

/// The pages' date, YYYY-MM-DD: `SOURCE_DATE_EPOCH` (reproducible builds),
/// else today (UTC).
fn page_date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
    }
}
