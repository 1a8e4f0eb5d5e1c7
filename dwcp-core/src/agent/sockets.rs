//! Who may use the agent's directories and sockets.
//!
//! QEMU under libvirt runs as an unprivileged user (Debian: `libvirt-qemu`).
//! On the source it connects to the route sockets `<run-dir>/NAME.sock`; on
//! the destination it creates its listening socket in `<incoming-dir>`. With
//! `--socket-group GROUP` the agent gives both directories to GROUP
//! (run dir `0750`, incoming dir `01770`: group members may create sockets
//! there, and the sticky bit keeps them from removing or renaming what they
//! do not own) and each route socket GROUP and `--socket-mode` (default
//! `0660`). The control socket `agent.sock` is always root's alone (`0600`).
//! Without a group the directories keep the mode they were created with and
//! route sockets get `--socket-mode` with the agent's own group.
//!
//! A socket path that already exists is reused only when nobody listens on it
//! (a stale socket of a crashed agent: connecting is refused); when something
//! answers, binding is refused with an error that says so.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use tracing::info;

/// Default mode of route sockets (`--socket-mode`).
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Mode of the run directory when a socket group is set.
pub const RUN_DIR_MODE: u32 = 0o750;
/// Mode of the incoming directory (and of a run directory that is also the
/// incoming directory) when a socket group is set: group members create
/// QEMU's incoming sockets there; sticky, so they cannot remove others' files.
pub const INCOMING_DIR_MODE: u32 = 0o1770;
/// Mode of the control socket, always.
pub const CONTROL_SOCKET_MODE: u32 = 0o600;

/// Owner group and mode of the sockets QEMU uses (`--socket-group`,
/// `--socket-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Group given the directories and route sockets; `None`: unchanged.
    pub group: Option<u32>,
    /// Mode of each route socket.
    pub mode: u32,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            group: None,
            mode: DEFAULT_SOCKET_MODE,
        }
    }
}

/// `--socket-mode`: octal permission bits (`0660`, `660`, `0o660`), at most
/// `0777`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    let bad = || format!("socket mode {s:?}: expected octal permission bits such as 0660");
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(bad());
    }
    let m = u32::from_str_radix(digits, 8).map_err(|_| bad())?;
    if m > 0o777 {
        return Err(format!(
            "socket mode {s:?}: only permission bits (at most 0777) may be set"
        ));
    }
    if m & 0o600 != 0o600 {
        return Err(format!(
            "socket mode {s:?}: the owner (the agent) needs read and write (0600)"
        ));
    }
    Ok(m)
}

/// `--socket-group`: a group name (looked up in the system's group
/// database) or a numeric gid.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name)
        .map_err(|_| format!("socket group {name:?}: not a valid group name"))?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: a zeroed `struct group` is a valid out-parameter (pointers null).
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: `c` is NUL-terminated; `grp`, `buf` (with its true length) and
    // `found` live across the call; getgrnam_r writes only into them.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(format!(
            "socket group {name:?}: looking it up failed: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    if found.is_null() {
        return Err(format!(
            "socket group {name:?}: no such group (libvirt's QEMU group is `libvirt-qemu` on Debian and Ubuntu, `qemu` on Fedora and RHEL)"
        ));
    }
    Ok(grp.gr_gid)
}

/// Creates `dir` if needed; with a group, gives it the group and `mode`.
pub(super) fn prepare_dir(dir: &Path, access: &SocketAccess, mode: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(dir, None, Some(gid)).map_err(|e| {
            std::io::Error::new(e.kind(), format!("setting its group to {gid}: {e}"))
        })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            std::io::Error::new(e.kind(), format!("setting its mode to {mode:04o}: {e}"))
        })?;
    }
    Ok(())
}

/// Removes a stale socket at `path` (nobody listens: connecting is refused);
/// an error when something listens there or the path is not a socket.
pub fn clear_stale(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            ErrorKind::AlreadyExists,
            "the path exists and is not a socket; remove it or choose another directory",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            ErrorKind::AddrInUse,
            "another process is listening on this socket (another agent, or a QEMU \
             waiting for an incoming migration of that name); stop it or remove the socket",
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            info!(
                "{}: replacing a stale socket nobody listens on",
                path.display()
            );
            std::fs::remove_file(path).or_else(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        }
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("cannot tell whether a process listens on it: {e}"),
        )),
    }
}

/// Connections a listener's kernel queue holds before connect(2) blocks or
/// SYNs are dropped (the kernel caps it at `net.core.somaxconn`, 4096 by
/// default). Hundreds of migrations set up at once queue here while the
/// agent is busy; with a short queue their connects failed instead.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Re-listens with [`LISTEN_BACKLOG`] (listen(2) on a listening socket only
/// changes its backlog). Best effort: the default queue still works.
pub fn deepen_backlog(l: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(l).listen(LISTEN_BACKLOG);
}

/// Binds a listening socket at `path` (a stale one there is replaced, see
/// [`clear_stale`]) and gives it `group` (if any) and `mode`.
pub fn bind_with(path: &Path, group: Option<u32>, mode: u32) -> std::io::Result<UnixListener> {
    clear_stale(path)?;
    let l = UnixListener::bind(path)?;
    deepen_backlog(&l);
    let set = || -> std::io::Result<()> {
        if let Some(gid) = group {
            std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| {
                std::io::Error::new(e.kind(), format!("setting its group to {gid}: {e}"))
            })?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            std::io::Error::new(e.kind(), format!("setting its mode to {mode:04o}: {e}"))
        })
    };
    if let Err(e) = set() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(l)
}

/// A group the tests may give files: as root any gid will do (65534),
/// otherwise the caller's own.
#[cfg(test)]
pub(crate) fn test_gid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        65534
    } else {
        // SAFETY: getegid has no preconditions and cannot fail.
        unsafe { libc::getegid() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn modes_parse_as_octal_permission_bits() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert_eq!(parse_mode("0600"), Ok(0o600));
        for bad in ["", "0x660", "668", "rw-rw----", "-660"] {
            assert!(parse_mode(bad).unwrap_err().contains("octal"), "{bad}");
        }
        assert!(parse_mode("4660").unwrap_err().contains("at most 0777"));
        assert!(parse_mode("0060").unwrap_err().contains("owner"));
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        assert_eq!(resolve_group("0"), Ok(0));
        assert_eq!(resolve_group("64055"), Ok(64055));
        assert_eq!(resolve_group("root"), Ok(0));
        let e = resolve_group("no-such-group-dwcp").unwrap_err();
        assert!(e.contains("no such group"), "{e}");
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dwcp-sockets-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_refused() {
        let d = tmp("stale");
        let p = d.join("g1.sock");
        // Stale: bound, then its listener dropped (the file stays).
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        let l = bind_with(&p, None, 0o600).unwrap();
        // Live: someone listens (the listener just bound).
        let e = bind_with(&p, None, 0o600).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        assert!(
            e.to_string().contains("another process is listening"),
            "{e}"
        );
        drop(l);
        // Not a socket: refused, left alone.
        let f = d.join("file.sock");
        std::fs::write(&f, b"x").unwrap();
        let e = bind_with(&f, None, 0o600).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn sockets_and_dirs_get_group_and_mode() {
        let d = tmp("modes");
        let gid = test_gid();
        let access = SocketAccess {
            group: Some(gid),
            mode: 0o640,
        };
        let run = d.join("run");
        prepare_dir(&run, &access, RUN_DIR_MODE).unwrap();
        let m = std::fs::metadata(&run).unwrap();
        assert_eq!((m.gid(), m.mode() & 0o7777), (gid, 0o750));
        let inc = run.join("incoming");
        prepare_dir(&inc, &access, INCOMING_DIR_MODE).unwrap();
        let m = std::fs::metadata(&inc).unwrap();
        assert_eq!((m.gid(), m.mode() & 0o7777), (gid, 0o1770));
        let s = run.join("g1.sock");
        let _l = bind_with(&s, access.group, access.mode).unwrap();
        let m = std::fs::symlink_metadata(&s).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!((m.gid(), m.mode() & 0o7777), (gid, 0o640));
        // Without a group: the directory keeps its mode.
        let plain = d.join("plain");
        std::fs::create_dir(&plain).unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o711)).unwrap();
        prepare_dir(&plain, &SocketAccess::default(), RUN_DIR_MODE).unwrap();
        assert_eq!(std::fs::metadata(&plain).unwrap().mode() & 0o7777, 0o711);
        let _ = std::fs::remove_dir_all(&d);
    }
}
