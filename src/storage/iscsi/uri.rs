//! `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN`, QEMU's (and
//! libiscsi's) syntax: default port 3260, an IPv6 address in brackets.
//! Nothing is percent-decoded (neither QEMU nor libiscsi does). The
//! password never appears in a message: [`IscsiUri`]'s `Display` leaves it
//! out, and so does [`redact`] for a string that did not parse.

use std::fmt;

/// The default iSCSI port (RFC 7143).
pub const DEFAULT_PORT: u16 = 3260;

/// Highest LUN taken (flat space addressing: 14 bits).
pub const MAX_LUN: u16 = 16383;

/// A parsed `iscsi://` URI.
#[derive(Clone, PartialEq, Eq)]
pub struct IscsiUri {
    pub user: Option<String>,
    /// Kept out of `Display` and `Debug`.
    pub password: Option<String>,
    /// A host name, an IPv4 address or an IPv6 address (without brackets).
    pub host: String,
    pub port: u16,
    pub target: String,
    pub lun: u16,
}

impl IscsiUri {
    /// Parses `uri`; errors are one line (the caller names the URI, with
    /// `redact`).
    pub fn parse(uri: &str) -> Result<IscsiUri, String> {
        let rest = uri
            .strip_prefix("iscsi://")
            .ok_or("not an iscsi:// URI (iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN)")?;
        // The user information ends at the URI's last '@' (a host, an
        // iSCSI name and a LUN have none), so a password may hold '/'.
        let (userinfo, after) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (hostport, path) = after
            .split_once('/')
            .ok_or("no target name (iscsi://HOST/TARGET-IQN/LUN)")?;
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, password) = match info.split_once('%') {
                    Some((u, p)) => (u, Some(p.to_string())),
                    None => (info, None),
                };
                if user.is_empty() {
                    return Err("empty user name before '@'".into());
                }
                (Some(user.to_string()), password)
            }
        };
        let (host, port) = parse_host_port(hostport)?;
        let (target, lun) = path
            .rsplit_once('/')
            .ok_or("no LUN (iscsi://HOST/TARGET-IQN/LUN)")?;
        if target.is_empty() {
            return Err("empty target name".into());
        }
        if target.contains('/') {
            return Err(format!("target name {target:?} contains '/'"));
        }
        let lun = match lun.parse::<u16>() {
            Ok(n) if n <= MAX_LUN && !lun.starts_with('+') => n,
            _ => return Err(format!("LUN {lun:?} is not a number from 0 to {MAX_LUN}")),
        };
        Ok(IscsiUri {
            user,
            password,
            host,
            port,
            target: target.to_string(),
            lun,
        })
    }
}

fn parse_host_port(hostport: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or("'[' without ']' around an IPv6 address")?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{addr:?} is not an IPv6 address"));
        }
        match after {
            "" => (addr, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (addr, Some(port)),
                None => return Err(format!("unexpected {after:?} after ']'")),
            },
        }
    } else {
        match hostport.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, Some(port)),
            Some(_) => return Err("an IPv6 address goes in brackets ([ADDRESS]:PORT)".into()),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && !p.starts_with('+') => n,
            _ => return Err(format!("port {p:?} is not a number from 1 to 65535")),
        },
    };
    Ok((host.to_string(), port))
}

impl fmt::Display for IscsiUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("iscsi://")?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if self.port != DEFAULT_PORT {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}/{}", self.target, self.lun)
    }
}

impl fmt::Debug for IscsiUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IscsiUri({self})")
    }
}

/// `uri` with any password (between the first '%' of the user
/// information and the URI's last '@') left out: for naming a URI, parsed
/// or not, in a message.
pub fn redact(uri: &str) -> String {
    let Some(rest) = uri.strip_prefix("iscsi://") else {
        return uri.to_string();
    };
    match (rest.find('%'), rest.rfind('@')) {
        (Some(pct), Some(at)) if pct < at => format!("iscsi://{}{}", &rest[..pct], &rest[at..]),
        _ => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> IscsiUri {
        IscsiUri::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn good_uris() {
        let u = ok("iscsi://192.0.2.1/iqn.2001-04.com.example:disk/1");
        assert_eq!(
            (
                u.user,
                u.password,
                u.host.as_str(),
                u.port,
                u.target.as_str(),
                u.lun
            ),
            (
                None,
                None,
                "192.0.2.1",
                3260,
                "iqn.2001-04.com.example:disk",
                1
            )
        );
        let u = ok("iscsi://alice%s3cr%t@storage.example:3261/iqn.x:y/0");
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("s3cr%t"));
        assert_eq!(
            (u.host.as_str(), u.port, u.lun),
            ("storage.example", 3261, 0)
        );
        let u = ok("iscsi://bob@[2001:db8::1]:3262/iqn.x/16383");
        assert_eq!((u.user.as_deref(), u.password), (Some("bob"), None));
        assert_eq!(
            (u.host.as_str(), u.port, u.lun),
            ("2001:db8::1", 3262, 16383)
        );
        let u = ok("iscsi://[::1]/iqn.x/2");
        assert_eq!((u.host.as_str(), u.port), ("::1", 3260));
    }

    #[test]
    fn display_never_shows_the_password() {
        let u = ok("iscsi://alice%hunter2@[::1]:3000/iqn.x/3");
        assert_eq!(u.to_string(), "iscsi://alice@[::1]:3000/iqn.x/3");
        assert!(!format!("{u:?}").contains("hunter2"));
        assert_eq!(
            redact("iscsi://alice%hunter2@host:x/iqn/1"),
            "iscsi://alice@host:x/iqn/1"
        );
        assert_eq!(redact("iscsi://host/iqn/1"), "iscsi://host/iqn/1");
    }

    #[test]
    fn bad_uris_say_why() {
        for (uri, why) in [
            ("nbd://h/iqn/1", "not an iscsi:// URI"),
            ("iscsi://host", "no target name"),
            ("iscsi://host/iqn", "no LUN"),
            ("iscsi://host//1", "empty target name"),
            ("iscsi://host/iqn/x", "LUN \"x\" is not a number"),
            ("iscsi://host/iqn/16384", "LUN \"16384\""),
            ("iscsi://host/iqn/", "LUN \"\""),
            ("iscsi://host:0/iqn/1", "port \"0\""),
            ("iscsi://host:99999/iqn/1", "port \"99999\""),
            ("iscsi://host:/iqn/1", "port \"\""),
            ("iscsi:///iqn/1", "no host"),
            ("iscsi://2001:db8::1/iqn/1", "IPv6 address goes in brackets"),
            ("iscsi://[2001:db8::1/iqn/1", "without ']'"),
            ("iscsi://[not-v6]/iqn/1", "is not an IPv6 address"),
            ("iscsi://[::1]x/iqn/1", "after ']'"),
            ("iscsi://%pw@host/iqn/1", "empty user name"),
            ("iscsi://host/a/b/1", "contains '/'"),
        ] {
            let err = IscsiUri::parse(uri).expect_err(uri);
            assert!(err.contains(why), "{uri}: {err:?} lacks {why:?}");
            assert!(!err.contains('\n'));
        }
    }
}
