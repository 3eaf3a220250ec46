//! iSCSI URLs in libiscsi's form:
//!
//! ```text
//! iscsi://[user[%secret]@]host[:port]/target-iqn/lun
//! iscsi://[user[%secret]@]host[:port][/]            (a portal, for discovery)
//! ```
//!
//! `host` is a DNS name, an IPv4 address, or an IPv6 address in brackets
//! (`[::1]`). The port defaults to 3260 (RFC 7143 §13.1, the IANA port). The
//! LUN is a decimal number 0..=16383, encoded as SAM-5 peripheral (LUN < 256)
//! or flat-space (256..=16383) addressing. A user name switches CHAP on; the
//! secret follows the first `%` (libiscsi's convention, so a secret may
//! itself contain `%` and `@`).
//!
//! `Display` never shows the secret (URLs end up in logs and error
//! messages); use [`IscsiUrl::to_url_string`] when the secret must survive.

use std::fmt;
use std::str::FromStr;

/// The IANA-assigned iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;

/// Highest LUN expressible with single-level flat space addressing.
pub const MAX_LUN: u16 = 0x3fff;

/// Why a string is not a valid iSCSI URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("URL must start with iscsi:// (got {0:?})")]
    Scheme(String),
    #[error("URL has no host")]
    MissingHost,
    #[error("IPv6 address must be closed with ']' in {0:?}")]
    UnclosedBracket(String),
    #[error("invalid IPv6 address {0:?}")]
    BadIpv6(String),
    #[error("invalid character {1:?} in host {0:?}")]
    BadHost(String, char),
    #[error("invalid port {0:?} (expected 1..=65535)")]
    BadPort(String),
    #[error("empty user name before '@'")]
    EmptyUser,
    #[error("URL names a target but no LUN: expected iscsi://host[:port]/target-iqn/lun")]
    MissingLun,
    #[error("invalid LUN {0:?} (expected a decimal number 0..=16383)")]
    BadLun(String),
    #[error("unexpected path after the LUN: {0:?}")]
    TrailingPath(String),
    #[error("empty target name")]
    EmptyTarget,
    #[error("URL has no target name: expected iscsi://host[:port]/target-iqn/lun")]
    MissingTarget,
}

/// A parsed iSCSI URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    /// CHAP user name, if any.
    pub user: Option<String>,
    /// CHAP secret, if any (only with a user).
    pub secret: Option<String>,
    /// Host name or address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Target IQN; `None` for a bare portal URL.
    pub target: Option<String>,
    /// LUN; present exactly when `target` is.
    pub lun: Option<u16>,
}

impl IscsiUrl {
    /// Parse a URL; a bare portal (no target, no LUN) is accepted.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let rest = strip_scheme(s).ok_or_else(|| UrlError::Scheme(s.to_string()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        // The secret may contain '@'; the host cannot.
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, secret) = match userinfo {
            None => (None, None),
            Some(ui) => {
                let (u, sec) = match ui.find('%') {
                    Some(i) => (&ui[..i], Some(ui[i + 1..].to_string())),
                    None => (ui, None),
                };
                if u.is_empty() {
                    return Err(UrlError::EmptyUser);
                }
                (Some(u.to_string()), sec)
            }
        };
        let (host, port) = parse_hostport(hostport)?;
        let (target, lun) = parse_path(path)?;
        Ok(IscsiUrl {
            user,
            secret,
            host,
            port,
            target,
            lun,
        })
    }

    /// Parse a URL that must name a target and a LUN.
    pub fn parse_full(s: &str) -> Result<Self, UrlError> {
        let u = Self::parse(s)?;
        if u.target.is_none() {
            return Err(UrlError::MissingTarget);
        }
        Ok(u)
    }

    /// The target name, or [`UrlError::MissingTarget`] for a portal URL.
    pub fn target(&self) -> Result<&str, UrlError> {
        self.target.as_deref().ok_or(UrlError::MissingTarget)
    }

    /// The LUN, or [`UrlError::MissingTarget`] for a portal URL.
    pub fn lun(&self) -> Result<u16, UrlError> {
        self.lun.ok_or(UrlError::MissingTarget)
    }

    /// `host:port` as a socket address string (IPv6 in brackets), suitable
    /// for `TcpStream::connect`.
    pub fn portal(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The same URL pointing at another target/LUN (e.g. after discovery).
    pub fn with_target(&self, target: &str, lun: u16) -> Self {
        IscsiUrl {
            target: Some(target.to_string()),
            lun: Some(lun),
            ..self.clone()
        }
    }

    /// The full URL including the CHAP secret.
    pub fn to_url_string(&self) -> String {
        self.render(true)
    }

    fn render(&self, with_secret: bool) -> String {
        let mut s = String::from("iscsi://");
        if let Some(u) = &self.user {
            s.push_str(u);
            if let Some(sec) = &self.secret {
                s.push('%');
                s.push_str(if with_secret { sec } else { "***" });
            }
            s.push('@');
        }
        s.push_str(&self.portal());
        if let (Some(t), Some(l)) = (&self.target, self.lun) {
            s.push('/');
            s.push_str(t);
            s.push('/');
            s.push_str(&l.to_string());
        }
        s
    }
}

impl fmt::Display for IscsiUrl {
    /// The URL with the secret masked as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl FromStr for IscsiUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, UrlError> {
        Self::parse(s)
    }
}

fn strip_scheme(s: &str) -> Option<&str> {
    let (scheme, rest) = s.split_once("://")?;
    scheme.eq_ignore_ascii_case("iscsi").then_some(rest)
}

fn parse_hostport(hp: &str) -> Result<(String, u16), UrlError> {
    if hp.is_empty() {
        return Err(UrlError::MissingHost);
    }
    let (host, port_str) = if let Some(inner) = hp.strip_prefix('[') {
        let close = inner
            .find(']')
            .ok_or_else(|| UrlError::UnclosedBracket(hp.to_string()))?;
        let addr = &inner[..close];
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(UrlError::BadIpv6(addr.to_string()));
        }
        let after = &inner[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(UrlError::BadPort(after.to_string())),
        };
        (addr.to_string(), port)
    } else {
        let (h, p) = match hp.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hp, None),
        };
        if h.is_empty() {
            return Err(UrlError::MissingHost);
        }
        if let Some(c) = h
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.' || *c == '_'))
        {
            return Err(UrlError::BadHost(h.to_string(), c));
        }
        (h.to_ascii_lowercase(), p)
    };
    let port = match port_str {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(UrlError::BadPort(p.to_string())),
        },
    };
    Ok((host, port))
}

fn parse_path(path: &str) -> Result<(Option<String>, Option<u16>), UrlError> {
    if path.is_empty() {
        return Ok((None, None));
    }
    let (target, rest) = match path.split_once('/') {
        Some((t, r)) => (t, Some(r)),
        None => (path, None),
    };
    if target.is_empty() {
        return Err(UrlError::EmptyTarget);
    }
    let rest = match rest {
        None | Some("") => return Err(UrlError::MissingLun),
        Some(r) => r,
    };
    let (lun_str, trailing) = match rest.split_once('/') {
        Some((l, t)) => (l, t),
        None => (rest, ""),
    };
    if !trailing.is_empty() {
        return Err(UrlError::TrailingPath(trailing.to_string()));
    }
    let lun = match lun_str.parse::<u16>() {
        Ok(n) if n <= MAX_LUN && lun_str.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => return Err(UrlError::BadLun(lun_str.to_string())),
    };
    Ok((Some(target.to_string()), Some(lun)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url_with_chap() {
        let u =
            IscsiUrl::parse("iscsi://alice%s3cr%t@@10.0.0.1:3261/iqn.2026-11.io.x:disk/3").unwrap();
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.secret.as_deref(), Some("s3cr%t@"));
        assert_eq!(u.host, "10.0.0.1");
        assert_eq!(u.port, 3261);
        assert_eq!(u.target.as_deref(), Some("iqn.2026-11.io.x:disk"));
        assert_eq!(u.lun, Some(3));
        assert_eq!(
            u.to_string(),
            "iscsi://alice%***@10.0.0.1:3261/iqn.2026-11.io.x:disk/3"
        );
        assert_eq!(IscsiUrl::parse(&u.to_url_string()).unwrap(), u);
    }

    #[test]
    fn defaults_and_ipv6() {
        let u = IscsiUrl::parse("iscsi://[::1]/iqn.a:b/0").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.port, DEFAULT_PORT);
        assert_eq!(u.portal(), "[::1]:3260");
        assert_eq!(u.to_string(), "iscsi://[::1]:3260/iqn.a:b/0");
        let u = IscsiUrl::parse("ISCSI://[fe80::1]:99").unwrap();
        assert_eq!((u.port, u.target.clone(), u.lun), (99, None, None));
        let u = IscsiUrl::parse("iscsi://Host.Example/").unwrap();
        assert_eq!(u.host, "host.example");
        assert_eq!(u.target(), Err(UrlError::MissingTarget));
    }

    #[test]
    fn precise_errors() {
        use UrlError::*;
        let e = |s: &str| IscsiUrl::parse(s).unwrap_err();
        assert_eq!(e("http://h/t/0"), Scheme("http://h/t/0".into()));
        assert_eq!(e("iscsi:///t/0"), MissingHost);
        assert_eq!(e("iscsi://:3260/t/0"), MissingHost);
        assert_eq!(e("iscsi://[::1/t/0"), UnclosedBracket("[::1".into()));
        assert_eq!(e("iscsi://[zz]/t/0"), BadIpv6("zz".into()));
        assert_eq!(e("iscsi://[::1]x/t/0"), BadPort("x".into()));
        assert_eq!(e("iscsi://h:0/t/0"), BadPort("0".into()));
        assert_eq!(e("iscsi://h:70000/t/0"), BadPort("70000".into()));
        assert_eq!(e("iscsi://h:+1/t/0"), BadPort("+1".into()));
        assert_eq!(e("iscsi://h o/t/0"), BadHost("h o".into(), ' '));
        assert_eq!(e("iscsi://%pw@h/t/0"), EmptyUser);
        assert_eq!(e("iscsi://h/t"), MissingLun);
        assert_eq!(e("iscsi://h/t/"), MissingLun);
        assert_eq!(e("iscsi://h//0"), EmptyTarget);
        assert_eq!(e("iscsi://h/t/16384"), BadLun("16384".into()));
        assert_eq!(e("iscsi://h/t/-1"), BadLun("-1".into()));
        assert_eq!(e("iscsi://h/t/0/x"), TrailingPath("x".into()));
        assert_eq!(IscsiUrl::parse_full("iscsi://h"), Err(MissingTarget));
    }
}
