//! Who is on the other end of a connection, as far as the transport can prove it: the verified
//! certificate of a TLS peer, or the kernel's credentials of a Unix-socket peer. The driver
//! hands this to the [`Provider`](super::Provider) with every OPEN.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// The identity of a connection's peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A TLS peer whose certificate chained to the configured CA (and passed the allow list).
    Certificate(CertIdentity),
    /// A Unix-socket peer, by the credentials the kernel recorded when it connected
    /// (SO_PEERCRED: the process's uid, primary gid and pid at connect time).
    Unix { uid: u32, gid: u32, pid: i32 },
    /// A plain TCP peer: only its address, which proves nothing.
    Address(SocketAddr),
    /// Nothing is known (the client side of a connection, or credentials unavailable).
    Unknown,
}

/// What a verified certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The subject distinguished name, attributes in the certificate's order joined with
    /// commas, e.g. `O=volstream,CN=backup-host` (the form libvirt's allow lists match).
    pub subject: String,
    /// Subject alternative names: DNS names, IP addresses, e-mail addresses and URIs.
    pub alt_names: Vec<String>,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Certificate(c) => f.write_str(&c.subject),
            PeerIdentity::Unix { uid, gid, pid } => write!(f, "uid={uid},gid={gid},pid={pid}"),
            PeerIdentity::Address(a) => write!(f, "unauthenticated {a}"),
            PeerIdentity::Unknown => f.write_str("unknown peer"),
        }
    }
}

/// Which local users may connect to a Unix listener. Empty lists admit anyone who can open
/// the socket file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixPeerPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl UnixPeerPolicy {
    pub fn is_open(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    /// Why this peer may not connect, or `None` if it may.
    pub fn refusal(&self, peer: &PeerIdentity) -> Option<String> {
        if self.is_open() {
            return None;
        }
        match peer {
            PeerIdentity::Unix { uid, gid, .. } => {
                if self.uids.contains(uid) || self.gids.contains(gid) {
                    None
                } else {
                    Some(format!("uid {uid} (gid {gid}) may not use this socket"))
                }
            }
            other => Some(format!("{other}: no credentials to check")),
        }
    }
}

/// The kernel's record of who connected a Unix socket.
pub fn unix_peer(fd: RawFd) -> PeerIdentity {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        log::warn!("SO_PEERCRED: {}", std::io::Error::last_os_error());
        return PeerIdentity::Unknown;
    }
    PeerIdentity::Unix {
        uid: cred.uid,
        gid: cred.gid,
        pid: cred.pid,
    }
}

/// Shell-style match: `*` any run of characters, `?` one character, everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Greedy with one backtrack point: linear in practice, never exponential.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob_match("CN=*", "CN=host"));
        assert!(glob_match(
            "O=volstream,CN=backup-*",
            "O=volstream,CN=backup-7"
        ));
        assert!(!glob_match(
            "O=volstream,CN=backup-*",
            "O=volstream,CN=admin"
        ));
        assert!(glob_match("C?=a*b", "CN=ab"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("", "x"));
        assert!(glob_match("*a*a*a*", "xaxaxax"));
        assert!(!glob_match("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
    }

    #[test]
    fn unix_policy_admits_listed_uids_or_gids() {
        let policy = UnixPeerPolicy {
            uids: vec![1000],
            gids: vec![50],
        };
        let peer = |uid, gid| PeerIdentity::Unix { uid, gid, pid: 1 };
        assert_eq!(policy.refusal(&peer(1000, 1)), None);
        assert_eq!(policy.refusal(&peer(7, 50)), None);
        assert!(policy.refusal(&peer(7, 7)).unwrap().contains("uid 7"));
        assert_eq!(UnixPeerPolicy::default().refusal(&peer(7, 7)), None);
    }
}
