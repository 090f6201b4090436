//! What the operator says about an iSCSI logical unit besides its URI:
//! the initiator name, CHAP credentials (the password from the URI, a file
//! or an environment variable), the command timeout, the header digest.

use std::path::PathBuf;
use std::time::Duration;

use super::uri::IscsiUri;

/// Where the CHAP password comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PasswordSource {
    /// The URI's `USER%PASSWORD@` (or no CHAP if the URI has no user).
    #[default]
    Uri,
    /// The first line of a file (read once, at open, before any sandbox;
    /// a trailing newline is not part of the password).
    File(PathBuf),
    /// An environment variable of the daemon.
    Env(String),
}

/// iSCSI header digest negotiation (`iscsi_set_header_digest`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeaderDigest {
    None,
    /// Offer none, accept CRC32C: QEMU's default (`header-digest` unset).
    #[default]
    NoneCrc32c,
    /// Offer CRC32C, accept none.
    Crc32cNone,
    Crc32c,
}

/// Options of one iSCSI logical unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IscsiOptions {
    /// The initiator's IQN; `None`: [`default_initiator_name`].
    pub initiator_name: Option<String>,
    /// CHAP user; overrides the URI's.
    pub user: Option<String>,
    pub password: PasswordSource,
    /// How long a command may wait for the remote (including a
    /// reconnection) before it completes with `TimedOut`; also the login
    /// timeout. Whole seconds (libiscsi's unit), at least 1.
    pub timeout: Duration,
    pub header_digest: HeaderDigest,
    /// Refuse writes (the operator's `ro`).
    pub read_only: bool,
}

/// [`IscsiOptions::timeout`]'s default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for IscsiOptions {
    fn default() -> Self {
        IscsiOptions {
            initiator_name: None,
            user: None,
            password: PasswordSource::Uri,
            timeout: DEFAULT_TIMEOUT,
            header_digest: HeaderDigest::default(),
            read_only: false,
        }
    }
}

/// A CHAP password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// CHAP user and password, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
}

/// QEMU's initiator name prefix (`iqn.2008-11.org.linux-kvm[:VMNAME]`).
pub const INITIATOR_PREFIX: &str = "iqn.2008-11.org.linux-kvm:vhost-device-scsi";

/// `iqn.2008-11.org.linux-kvm:vhost-device-scsi.HOSTNAME` (the host name
/// lowercased, characters an IQN does not take replaced by '-'), or the
/// prefix alone if the host name cannot be read.
pub fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    initiator_name_for(host.trim())
}

fn initiator_name_for(host: &str) -> String {
    if host.is_empty() {
        return INITIATOR_PREFIX.to_string();
    }
    let host: String = host
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    format!("{INITIATOR_PREFIX}.{host}")
}

impl IscsiOptions {
    /// The credentials to log in with, from the options and the URI;
    /// `None` for no CHAP. Errors are one line without the password.
    pub fn credentials(&self, uri: &IscsiUri) -> Result<Option<Credentials>, String> {
        let user = self.user.clone().or_else(|| uri.user.clone());
        let password = match &self.password {
            PasswordSource::Uri => uri.password.clone(),
            other => {
                if uri.password.is_some() {
                    return Err(
                        "the password is given both in the URI and as an option".to_string()
                    );
                }
                Some(match other {
                    PasswordSource::File(path) => {
                        let text = std::fs::read_to_string(path)
                            .map_err(|e| format!("password file {}: {e}", path.display()))?;
                        let line = text.lines().next().unwrap_or("").to_string();
                        if line.is_empty() {
                            return Err(format!("password file {} is empty", path.display()));
                        }
                        line
                    }
                    PasswordSource::Env(var) => match std::env::var(var) {
                        Ok(v) if !v.is_empty() => v,
                        Ok(_) => return Err(format!("environment variable {var} is empty")),
                        Err(_) => return Err(format!("environment variable {var} is not set")),
                    },
                    PasswordSource::Uri => unreachable!(),
                })
            }
        };
        match (user, password) {
            (None, None) => Ok(None),
            (Some(user), Some(password)) => {
                if user.contains('\0') || password.contains('\0') {
                    return Err("a NUL byte in the CHAP user or password".to_string());
                }
                Ok(Some(Credentials {
                    user,
                    password: Secret(password),
                }))
            }
            (Some(user), None) => Err(format!("CHAP user {user} has no password")),
            (None, Some(_)) => Err("a CHAP password without a user".to_string()),
        }
    }

    /// The timeout in whole seconds, at least 1.
    pub(super) fn timeout_secs(&self) -> u64 {
        self.timeout.as_secs().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> IscsiUri {
        IscsiUri::parse(s).unwrap()
    }

    #[test]
    fn defaults() {
        let o = IscsiOptions::default();
        assert_eq!(o.timeout, Duration::from_secs(30));
        assert_eq!(o.password, PasswordSource::Uri);
        assert_eq!(o.header_digest, HeaderDigest::NoneCrc32c);
        assert!(!o.read_only);
        assert_eq!(o.credentials(&uri("iscsi://h/iqn/1")), Ok(None));
    }

    #[test]
    fn initiator_name() {
        assert_eq!(
            initiator_name_for("Host_1.example"),
            "iqn.2008-11.org.linux-kvm:vhost-device-scsi.host-1.example"
        );
        assert_eq!(initiator_name_for(""), INITIATOR_PREFIX);
        assert!(default_initiator_name().starts_with(INITIATOR_PREFIX));
    }

    #[test]
    fn credentials_from_the_uri() {
        let o = IscsiOptions::default();
        let c = o.credentials(&uri("iscsi://u%p@h/iqn/1")).unwrap().unwrap();
        assert_eq!((c.user.as_str(), c.password.0.as_str()), ("u", "p"));
        assert!(!format!("{c:?}").contains("\"p\""));
        // The option's user wins over the URI's.
        let o = IscsiOptions {
            user: Some("v".into()),
            ..IscsiOptions::default()
        };
        let c = o.credentials(&uri("iscsi://u%p@h/iqn/1")).unwrap().unwrap();
        assert_eq!(c.user, "v");
        assert_eq!(
            IscsiOptions::default().credentials(&uri("iscsi://u@h/iqn/1")),
            Err("CHAP user u has no password".to_string())
        );
    }

    #[test]
    fn credentials_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\nignored\n").unwrap();
        let o = IscsiOptions {
            user: Some("u".into()),
            password: PasswordSource::File(path.clone()),
            ..IscsiOptions::default()
        };
        let c = o.credentials(&uri("iscsi://h/iqn/1")).unwrap().unwrap();
        assert_eq!(c.password.0, "s3cret");
        // Twice is an error, and does not name the password.
        let err = o.credentials(&uri("iscsi://u%other@h/iqn/1")).unwrap_err();
        assert!(err.contains("both in the URI and as an option"));
        assert!(!err.contains("other"));
        // A missing file, an empty file.
        let missing = IscsiOptions {
            password: PasswordSource::File(dir.path().join("none")),
            ..o.clone()
        };
        assert!(missing
            .credentials(&uri("iscsi://h/iqn/1"))
            .unwrap_err()
            .starts_with("password file "));
        std::fs::write(&path, "\n").unwrap();
        assert!(o
            .credentials(&uri("iscsi://h/iqn/1"))
            .unwrap_err()
            .ends_with("is empty"));
        // A password without any user.
        let nouser = IscsiOptions {
            user: None,
            password: PasswordSource::File(path.clone()),
            ..IscsiOptions::default()
        };
        std::fs::write(&path, "x").unwrap();
        assert_eq!(
            nouser.credentials(&uri("iscsi://h/iqn/1")),
            Err("a CHAP password without a user".to_string())
        );
    }

    #[test]
    fn credentials_from_the_environment() {
        let var = format!("VHOST_SCSI_ISCSI_TEST_PW_{}", std::process::id());
        let o = IscsiOptions {
            user: Some("u".into()),
            password: PasswordSource::Env(var.clone()),
            ..IscsiOptions::default()
        };
        assert_eq!(
            o.credentials(&uri("iscsi://h/iqn/1")),
            Err(format!("environment variable {var} is not set"))
        );
        std::env::set_var(&var, "envpw");
        let c = o.credentials(&uri("iscsi://h/iqn/1")).unwrap().unwrap();
        assert_eq!(c.password.0, "envpw");
        std::env::remove_var(&var);
    }
}
