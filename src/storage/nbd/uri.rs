//! NBD URIs (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md>,
//! as QEMU accepts them): `nbd://HOST[:PORT]/EXPORT` (TCP, port 10809 by
//! default, `[v6 address]` in brackets) and
//! `nbd+unix:///EXPORT?socket=PATH` (a Unix socket). The export name is
//! the path without its first `/`, percent-decoded. TLS (`nbds`) is not
//! supported.

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub address: NbdAddress,
    pub export: String,
    /// The URI as given, for messages.
    text: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl NbdUri {
    /// Parses `text`; the error says what is wrong (the caller names the
    /// URI).
    pub fn parse(text: &str) -> Result<NbdUri, String> {
        let (scheme, rest) = text.split_once("://").ok_or(
            "not a URI (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)",
        )?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return Err("fragments are not allowed".into());
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path)?;
        let address = match scheme {
            "nbd" | "nbd+tcp" => {
                if let Some(q) = query {
                    return Err(format!(
                        "unexpected query \"{q}\" (only nbd+unix takes socket=)"
                    ));
                }
                let (host, port) = host_port(authority)?;
                NbdAddress::Tcp { host, port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(format!(
                        "nbd+unix takes no host (\"{authority}\"): nbd+unix:///EXPORT?socket=PATH"
                    ));
                }
                let mut socket = None;
                for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                    match pair.split_once('=') {
                        Some(("socket", v)) if socket.is_none() => {
                            socket = Some(percent_decode(v)?)
                        }
                        Some(("socket", _)) => return Err("socket= given twice".into()),
                        _ => return Err(format!("unknown query parameter \"{pair}\"")),
                    }
                }
                match socket {
                    Some(s) if !s.is_empty() => NbdAddress::Unix(PathBuf::from(s)),
                    _ => return Err("missing ?socket=PATH".into()),
                }
            }
            "nbds" | "nbds+unix" | "nbds+tcp" => return Err("TLS (nbds) is not supported".into()),
            "nbd+vsock" | "nbds+vsock" => return Err("vsock is not supported".into()),
            other => {
                return Err(format!(
                    "unknown scheme \"{other}\" (expected nbd or nbd+unix)"
                ))
            }
        };
        if export.len() > 4096 {
            return Err("export name longer than 4096 bytes".into());
        }
        Ok(NbdUri {
            address,
            export,
            text: text.to_string(),
        })
    }
}

fn host_port(authority: &str) -> Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("user information is not supported".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ]")?),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => return Err(format!("bad port \"{p}\"")),
        },
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("bad percent escape")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes are not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> NbdAddress {
        NbdAddress::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn tcp_uris() {
        let u = NbdUri::parse("nbd://example.com/disk").unwrap();
        assert_eq!(
            (u.address, u.export.as_str()),
            (tcp("example.com", 10809), "disk")
        );
        let u = NbdUri::parse("nbd://127.0.0.1:1234/a%20b/c").unwrap();
        assert_eq!(
            (u.address, u.export.as_str()),
            (tcp("127.0.0.1", 1234), "a b/c")
        );
        let u = NbdUri::parse("nbd://[::1]:99").unwrap();
        assert_eq!((u.address, u.export.as_str()), (tcp("::1", 99), ""));
        let u = NbdUri::parse("nbd://[fe80::1]/").unwrap();
        assert_eq!(u.address, tcp("fe80::1", 10809));
        assert_eq!(u.to_string(), "nbd://[fe80::1]/");
    }

    #[test]
    fn unix_uris() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/x.sock").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/run/x.sock".into()));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd+unix://?socket=%2Ftmp%2Fs").unwrap();
        assert_eq!(
            (u.address, u.export.as_str()),
            (NbdAddress::Unix("/tmp/s".into()), "")
        );
    }

    #[test]
    fn bad_uris_say_why() {
        for (uri, why) in [
            ("disk.raw", "not a URI"),
            ("http://h/x", "unknown scheme"),
            ("nbds://h/x", "TLS"),
            ("nbd://h:0/x", "bad port"),
            ("nbd://h:x/x", "bad port"),
            ("nbd://h:70000/x", "bad port"),
            ("nbd:///x", "missing host"),
            ("nbd://[::1/x", "unclosed"),
            ("nbd://h/x?socket=/s", "unexpected query"),
            ("nbd+unix:///x", "missing ?socket"),
            ("nbd+unix://h/x?socket=/s", "takes no host"),
            ("nbd+unix:///x?socket=/s&tls=1", "unknown query parameter"),
            ("nbd+unix:///x?socket=/s&socket=/t", "twice"),
            ("nbd://h/%zz", "percent"),
            ("nbd://h/x#frag", "fragments"),
        ] {
            let err = NbdUri::parse(uri).unwrap_err();
            assert!(err.contains(why), "{uri}: {err}");
        }
    }
}
