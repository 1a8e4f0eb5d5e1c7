//! How `dwcp` fails: every error is of one class ([`FailKind`]), each class
//! with its own exit code, and with `--json` the failure is printed to
//! stdout as one object `{"error": MESSAGE, "kind": KIND, "exit_code": N}`.
//!
//! The class comes from the error's type, never from its text: a
//! [`Classified`] error made where the class is known (a QEMU migration
//! that failed, a refusal by the destination), else what the chain of
//! causes holds ([`ControlError`]: the agent unreachable, or a cluster op
//! refused; [`clap::Error`]: bad usage).

use dwcp_core::agent::{ClusterErrorKind, ControlError};
use serde_json::{json, Value};

/// The classes of failure, each with its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// Bad command line (clap's own errors, conflicting flags).
    Usage,
    /// The agent's control socket is missing or refuses connections.
    AgentUnreachable,
    /// The migration started and did not complete (QEMU or libvirt failed,
    /// timed out or was cancelled; the guest stays on the source).
    MigrationFailed,
    /// The raft cluster refused: the registry said no (guest migrating or
    /// owned elsewhere, epoch already committed), or the agent is no member.
    ClusterRefused,
    /// The destination refused the migration (not expected, this source's
    /// identity not allowed) or TLS authentication between the agents failed.
    PeerRefused,
    /// A configuration file with errors (`dwcp config check`).
    Config,
    /// Anything else.
    Other,
}

impl FailKind {
    /// Every class, in the order the help lists them.
    pub const ALL: [FailKind; 7] = [
        FailKind::Other,
        FailKind::Config,
        FailKind::Usage,
        FailKind::AgentUnreachable,
        FailKind::MigrationFailed,
        FailKind::ClusterRefused,
        FailKind::PeerRefused,
    ];

    pub fn exit_code(self) -> i32 {
        match self {
            FailKind::Other | FailKind::Config => 1,
            FailKind::Usage => 2,
            FailKind::AgentUnreachable => 3,
            FailKind::MigrationFailed => 4,
            FailKind::ClusterRefused => 5,
            FailKind::PeerRefused => 6,
        }
    }

    /// The `kind` of the JSON error object.
    pub fn name(self) -> &'static str {
        match self {
            FailKind::Usage => "usage",
            FailKind::AgentUnreachable => "agent_unreachable",
            FailKind::MigrationFailed => "migration_failed",
            FailKind::ClusterRefused => "cluster_refused",
            FailKind::PeerRefused => "peer_refused",
            FailKind::Config => "config",
            FailKind::Other => "error",
        }
    }
}

/// An error whose class is known where it is made. Its text is the inner
/// error's whole chain (and it has no `source()`), so wrapping changes no
/// message.
#[derive(Debug)]
pub struct Classified {
    pub kind: FailKind,
    inner: anyhow::Error,
}

impl std::fmt::Display for Classified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.inner)
    }
}

impl std::error::Error for Classified {}

/// `e`, marked as of class `kind`.
pub fn classified(kind: FailKind, e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Classified {
        kind,
        inner: e.into(),
    })
}

/// The problems `dwcp config check` found (the JSON error lists them).
#[derive(Debug)]
pub struct ConfigProblems {
    pub file: String,
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} problem(s)", self.file, self.problems.len())
    }
}

impl std::error::Error for ConfigProblems {}

/// The class of `e`: the outermost [`Classified`] in it, else the first
/// cause whose type tells.
pub fn classify(e: &anyhow::Error) -> FailKind {
    if let Some(c) = e.downcast_ref::<Classified>() {
        return c.kind;
    }
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<Classified>() {
            return c.kind;
        }
        if let Some(c) = cause.downcast_ref::<ControlError>() {
            return control_kind(c);
        }
        if cause.downcast_ref::<clap::Error>().is_some() {
            return FailKind::Usage;
        }
        if cause.downcast_ref::<ConfigProblems>().is_some() {
            return FailKind::Config;
        }
    }
    FailKind::Other
}

/// The class of a failed control request.
pub fn control_kind(c: &ControlError) -> FailKind {
    if c.unreachable {
        return FailKind::AgentUnreachable;
    }
    match c.kind {
        Some(k) if k.refused_by_registry() || k == ClusterErrorKind::NotMember => {
            FailKind::ClusterRefused
        }
        _ => FailKind::Other,
    }
}

/// The JSON object printed for a failure under `--json`.
pub fn json_error(e: &anyhow::Error) -> Value {
    let kind = classify(e);
    let mut v =
        json!({"error": format!("{e:#}"), "kind": kind.name(), "exit_code": kind.exit_code()});
    if let Some(p) = e.chain().find_map(|c| c.downcast_ref::<ConfigProblems>()) {
        v["file"] = json!(p.file);
        v["problems"] = json!(p.problems);
    }
    v
}

/// The exit-code table of `dwcp --help` and the docs.
pub fn exit_code_help() -> String {
    let mut s = String::from(
        "Exit status (the same with and without --json; with --json a failure is printed to \
         stdout as {\"error\": MESSAGE, \"kind\": KIND, \"exit_code\": N}):\n",
    );
    for k in FailKind::ALL {
        let what = match k {
            FailKind::Other => "any other error",
            FailKind::Config => "a configuration file with errors (dwcp config check)",
            FailKind::Usage => "bad usage: unknown flag, bad value, missing argument",
            FailKind::AgentUnreachable => {
                "the agent's control socket is missing or refuses connections"
            }
            FailKind::MigrationFailed => {
                "the migration failed, timed out or was cancelled (the guest stays on the source)"
            }
            FailKind::ClusterRefused => {
                "refused by the cluster: guest migrating or owned elsewhere, already committed, \
                 or the agent is no cluster member"
            }
            FailKind::PeerRefused => {
                "refused by the destination: migration not expected, this source not allowed, \
                 its --max-sessions or --session-memory limit, or TLS authentication failed"
            }
        };
        s.push_str(&format!("  {}  {:<17}  {what}\n", k.exit_code(), k.name()));
    }
    s.push_str("  0  success");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn control(unreachable: bool, kind: Option<ClusterErrorKind>) -> ControlError {
        ControlError {
            message: "m".into(),
            kind,
            unreachable,
        }
    }

    #[test]
    fn classes_come_from_types_through_context() {
        let e = anyhow::Error::from(control(true, None)).context("setting up the route");
        assert_eq!(classify(&e), FailKind::AgentUnreachable);
        assert_eq!(
            classify(&anyhow::Error::from(control(
                false,
                Some(ClusterErrorKind::AlreadyCommitted)
            ))),
            FailKind::ClusterRefused
        );
        assert_eq!(
            classify(&anyhow::Error::from(control(
                false,
                Some(ClusterErrorKind::NotMember)
            ))),
            FailKind::ClusterRefused
        );
        assert_eq!(
            classify(&anyhow::Error::from(control(false, None))),
            FailKind::Other
        );
        let m = classified(
            FailKind::MigrationFailed,
            anyhow::anyhow!("failed: boom").context("QEMU migration"),
        )
        .context("outer");
        assert_eq!(classify(&m), FailKind::MigrationFailed);
        // The mark adds no text.
        assert_eq!(format!("{m:#}"), "outer: QEMU migration: failed: boom");
        // The outermost mark wins over a control error inside it.
        let p = classified(
            FailKind::PeerRefused,
            anyhow::Error::from(control(true, None)),
        );
        assert_eq!(classify(&p), FailKind::PeerRefused);
        assert_eq!(classify(&anyhow::anyhow!("plain")), FailKind::Other);
        let r: anyhow::Result<()> = Err(ConfigProblems {
            file: "f".into(),
            problems: vec!["a".into()],
        })
        .context("x");
        let e = r.unwrap_err();
        assert_eq!(classify(&e), FailKind::Config);
        let v = json_error(&e);
        assert_eq!(v["kind"], "config");
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["problems"][0], "a");
    }

    #[test]
    fn exit_codes_are_distinct_per_class_and_documented() {
        let help = exit_code_help();
        for k in FailKind::ALL {
            assert!(help.contains(k.name()), "{help}");
        }
        let mut codes: Vec<i32> = FailKind::ALL
            .iter()
            .filter(|k| **k != FailKind::Config)
            .map(|k| k.exit_code())
            .collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6]);
    }
}
