//! NBD URIs as qemu, libnbd and nbdkit write them (the NBD project's doc/uri.md):
//! `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`. TLS schemes (`nbds`,
//! `nbds+unix`) are recognised and refused.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub endpoint: Endpoint,
    /// The export name ("" is the server's default export).
    pub export: String,
}

impl Uri {
    /// Whether `s` is meant as an NBD URI (rather than a file or volume name).
    pub fn is_nbd(s: &str) -> bool {
        [
            "nbd://",
            "nbd+unix://",
            "nbds://",
            "nbds+unix://",
            "nbd+tcp://",
        ]
        .iter()
        .any(|p| s.starts_with(p))
    }
}

impl FromStr for Uri {
    type Err = String;

    fn from_str(s: &str) -> Result<Uri, String> {
        let bad = |why: &str| format!("{s:?} is not a usable NBD URI: {why}");
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        let mut socket = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "socket" => socket = Some(decode(v).ok_or_else(|| bad("bad %-escape in socket"))?),
                "tls-certificates" | "tls-psk-file" | "tls-hostname" => {
                    return Err(bad("TLS is not supported"))
                }
                _ => return Err(bad(&format!("unknown query parameter {k:?}"))),
            }
        }
        let endpoint = match scheme {
            "nbd" | "nbd+tcp" => {
                if socket.is_some() {
                    return Err(bad("socket= belongs to nbd+unix://"));
                }
                let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad port"))?;
                if host.is_empty() {
                    return Err(bad("no host"));
                }
                Endpoint::Tcp {
                    host,
                    port: port.unwrap_or(DEFAULT_PORT),
                }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "nbd+unix:// takes no host (write nbd+unix:///EXPORT?socket=PATH)",
                    ));
                }
                Endpoint::Unix(PathBuf::from(
                    socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?,
                ))
            }
            "nbds" | "nbds+unix" => return Err(bad("TLS is not supported")),
            _ => return Err(bad("the scheme is not nbd:// or nbd+unix://")),
        };
        Ok(Uri { endpoint, export })
    }
}

fn split_host_port(a: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = a.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), Some(p.parse().ok()?))),
        None => Some((a.to_string(), None)),
    }
}

/// Percent-decoding; `None` for a broken escape or a result that is not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::new();
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || keep.contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = encode(&self.export, b"/");
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            Endpoint::Unix(p) => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                encode(&p.to_string_lossy(), b"/")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Uri {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn forms() {
        assert_eq!(
            parse("nbd://example.com/disk"),
            Uri {
                endpoint: Endpoint::Tcp {
                    host: "example.com".into(),
                    port: DEFAULT_PORT
                },
                export: "disk".into()
            }
        );
        assert_eq!(
            parse("nbd://127.0.0.1:1234"),
            Uri {
                endpoint: Endpoint::Tcp {
                    host: "127.0.0.1".into(),
                    port: 1234
                },
                export: "".into()
            }
        );
        assert_eq!(
            parse("nbd://[::1]:99/a%20b/c"),
            Uri {
                endpoint: Endpoint::Tcp {
                    host: "::1".into(),
                    port: 99
                },
                export: "a b/c".into()
            }
        );
        assert_eq!(
            parse("nbd+unix:///?socket=/tmp/s%2Bx.sock"),
            Uri {
                endpoint: Endpoint::Unix("/tmp/s+x.sock".into()),
                export: "".into()
            }
        );
        assert_eq!(parse("nbd+unix:///vm1?socket=/run/x").export, "vm1");
    }

    #[test]
    fn refusals() {
        for s in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbds://h/x",
            "nbd://h:notaport/x",
            "nbd:///x",
            "nbd://h/%zz",
            "nbd://h/x?socket=/s",
            "http://h/x",
            "nbd://h/x?frob=1",
        ] {
            assert!(s.parse::<Uri>().is_err(), "{s} parsed");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://h:10809/a%20b",
            "nbd+unix:///e?socket=/tmp/x%20y",
            "nbd://[::1]:5/",
        ] {
            let u = parse(s);
            assert_eq!(parse(&u.to_string()), u, "{s}");
        }
    }
}
