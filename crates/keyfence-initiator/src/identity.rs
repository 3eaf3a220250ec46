//! Who the initiator is: its iSCSI name and the ISID of each session.
//!
//! # Initiator name
//!
//! Resolved in this order, first hit wins:
//! 1. an explicit name (`--initiator-name`),
//! 2. the environment variable `KEYFENCE_INITIATOR_NAME`,
//! 3. the `InitiatorName=` line of `/etc/iscsi/initiatorname.iscsi` (the
//!    open-iscsi node name, so keyfence tools act as the same initiator as the
//!    host's kernel initiator),
//! 4. a name derived from the host name: `iqn.2026-11.io.keyfence.host:<hostname>`.
//!
//! Every name is checked against the iSCSI name rules of RFC 7143 §4.2.7
//! (`iqn.`, `eui.` or `naa.` forms, at most 223 bytes) and lower-cased
//! (iSCSI names are case-insensitive; RFC 3722 maps them to lower case).
//!
//! # ISID
//!
//! An iSCSI initiator port is `<initiator name>,i,0x<ISID>`, and SCSI
//! persistent reservations belong to the I_T nexus, i.e. to (initiator port,
//! target port). A command-line tool that REGISTERs in one run and RESERVEs
//! in the next must therefore log in with the *same* ISID both times, or the
//! second run is a different, unregistered nexus and gets RESERVATION
//! CONFLICT. A random ISID per run is wrong for PR, and a single fixed ISID
//! makes two paths to the same target from one host collide.
//!
//! keyfence therefore derives the ISID deterministically from
//! (initiator name, target portal, target name) using the "Random" ISID
//! format of RFC 7143 §11.12.5: T = 0b10, A = 0 (reserved), and the 24-bit B/C
//! and 16-bit D (qualifier) fields filled with 40 bits of a 64-bit FNV-1a hash
//! of the three strings. The hash is fixed by this module (not std's
//! `DefaultHasher`, whose output may change between Rust releases), so the
//! same host gets the same ISID for the same path across runs, versions and
//! machines. An explicitly configured ISID overrides the derivation.
//!
//! The portal is hashed as written in the URL (`host:port`, host lower-cased),
//! so `localhost` and `127.0.0.1` are different paths; use one spelling
//! consistently or configure the ISID.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Environment variable consulted for the initiator name.
pub const ENV_INITIATOR_NAME: &str = "KEYFENCE_INITIATOR_NAME";
/// The open-iscsi initiator name file.
pub const INITIATOR_NAME_FILE: &str = "/etc/iscsi/initiatorname.iscsi";
/// Prefix of names derived from the host name.
pub const HOST_NAME_PREFIX: &str = "iqn.2026-11.io.keyfence.host:";
/// Maximum length of an iSCSI name in bytes (RFC 7143 §4.2.7.1).
pub const MAX_NAME_LEN: usize = 223;

/// Why a name or ISID is unacceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("empty iSCSI name")]
    Empty,
    #[error("iSCSI name is {0} bytes long (at most 223)")]
    TooLong(usize),
    #[error("iSCSI name {0:?} must start with iqn., eui. or naa.")]
    BadPrefix(String),
    #[error("iSCSI name {0:?} contains invalid character {1:?}")]
    BadChar(String, char),
    #[error("malformed iqn name {0:?}: expected iqn.yyyy-mm.reversed.domain[:identifier]")]
    BadIqn(String),
    #[error("malformed {0:?}: eui. takes 16 hex digits, naa. 16 or 32")]
    BadHexName(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(
        "cannot determine the host name to derive an initiator name; set {ENV_INITIATOR_NAME}"
    )]
    NoHostName,
    #[error("invalid ISID {0:?}: expected up to 12 hex digits (optionally 0x-prefixed)")]
    BadIsid(String),
}

/// Where the initiator name came from (shown by verbose tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameSource {
    Explicit,
    Environment,
    File(PathBuf),
    HostName,
}

impl fmt::Display for NameSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameSource::Explicit => f.write_str("command line"),
            NameSource::Environment => write!(f, "${ENV_INITIATOR_NAME}"),
            NameSource::File(p) => write!(f, "{}", p.display()),
            NameSource::HostName => f.write_str("derived from host name"),
        }
    }
}

/// A resolved, validated initiator name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitiatorName {
    pub name: String,
    pub source: NameSource,
}

/// Resolve the initiator name as documented in the module docs.
pub fn resolve_initiator_name(explicit: Option<&str>) -> Result<InitiatorName, IdentityError> {
    resolve_with(
        explicit,
        std::env::var(ENV_INITIATOR_NAME).ok().as_deref(),
        Path::new(INITIATOR_NAME_FILE),
        host_name,
    )
}

/// [`resolve_initiator_name`] with its inputs made explicit (for tests).
pub fn resolve_with(
    explicit: Option<&str>,
    env: Option<&str>,
    file: &Path,
    host: impl FnOnce() -> Option<String>,
) -> Result<InitiatorName, IdentityError> {
    if let Some(n) = explicit {
        return Ok(InitiatorName {
            name: validate_name(n)?,
            source: NameSource::Explicit,
        });
    }
    if let Some(n) = env.filter(|s| !s.trim().is_empty()) {
        return Ok(InitiatorName {
            name: validate_name(n.trim())?,
            source: NameSource::Environment,
        });
    }
    match std::fs::read_to_string(file) {
        Ok(text) => {
            if let Some(n) = parse_initiator_name_file(&text) {
                let name = validate_name(n).map_err(|e| IdentityError::File {
                    path: file.to_path_buf(),
                    message: e.to_string(),
                })?;
                return Ok(InitiatorName {
                    name,
                    source: NameSource::File(file.to_path_buf()),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(IdentityError::File {
                path: file.to_path_buf(),
                message: e.to_string(),
            })
        }
    }
    let h = host().ok_or(IdentityError::NoHostName)?;
    let label = sanitize_host(&h).ok_or(IdentityError::NoHostName)?;
    Ok(InitiatorName {
        name: validate_name(&format!("{HOST_NAME_PREFIX}{label}"))?,
        source: NameSource::HostName,
    })
}

/// The value of the last `InitiatorName=` line, ignoring comments (as
/// open-iscsi's iscsid does).
pub fn parse_initiator_name_file(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("InitiatorName="))
        .map(str::trim)
        .rfind(|v| !v.is_empty())
}

fn host_name() -> Option<String> {
    for p in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim();
            if !s.is_empty() {
                return Some(s.to_string());
            }
        }
    }
    std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty())
}

/// Lower-case a host name and map anything outside `[a-z0-9.-]` to `-`.
fn sanitize_host(h: &str) -> Option<String> {
    let s: String = h
        .trim()
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches(|c| c == '-' || c == '.').to_string();
    (!s.is_empty()).then_some(s)
}

/// Check an iSCSI name (RFC 7143 §4.2.7) and return it lower-cased.
pub fn validate_name(name: &str) -> Result<String, IdentityError> {
    if name.is_empty() {
        return Err(IdentityError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(IdentityError::TooLong(name.len()));
    }
    let lower = name.to_ascii_lowercase();
    if let Some(c) = lower
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || ".-:".contains(*c)))
    {
        return Err(IdentityError::BadChar(name.to_string(), c));
    }
    if let Some(rest) = lower.strip_prefix("iqn.") {
        // iqn.yyyy-mm.<reversed domain>[:<anything>]
        let b = rest.as_bytes();
        let date_ok = b.len() > 8
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[5..7].iter().all(u8::is_ascii_digit)
            && b[7] == b'.'
            && matches!(
                &rest[5..7],
                "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
            );
        let domain = rest.get(8..).unwrap_or("");
        let domain = domain.split(':').next().unwrap_or("");
        if !date_ok || domain.is_empty() || domain.starts_with('.') {
            return Err(IdentityError::BadIqn(name.to_string()));
        }
    } else if let Some(hex) = lower.strip_prefix("eui.") {
        if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdentityError::BadHexName(name.to_string()));
        }
    } else if let Some(hex) = lower.strip_prefix("naa.") {
        if !(hex.len() == 16 || hex.len() == 32) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdentityError::BadHexName(name.to_string()));
        }
    } else {
        return Err(IdentityError::BadPrefix(name.to_string()));
    }
    Ok(lower)
}

/// A 48-bit initiator session identifier (RFC 7143 §11.12.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Isid(u64);

impl Isid {
    /// The T field value of the "Random" ISID format.
    pub const TYPE_RANDOM: u8 = 0b10;

    /// An ISID from its 48-bit value (upper 16 bits must be zero).
    pub fn new(v: u64) -> Option<Isid> {
        (v >> 48 == 0).then_some(Isid(v))
    }

    /// Derive the ISID for a path deterministically (see module docs).
    pub fn derive(initiator_name: &str, portal: &str, target_name: &str) -> Isid {
        let mut h = Fnv1a::new();
        // Length-prefix each field so ("ab","c") and ("a","bc") differ.
        for part in [
            initiator_name.to_ascii_lowercase(),
            portal.to_ascii_lowercase(),
            target_name.to_ascii_lowercase(),
        ] {
            h.write(&(part.len() as u64).to_be_bytes());
            h.write(part.as_bytes());
        }
        let bits40 = h.finish() & 0xff_ffff_ffff;
        // T=10 (random), A=0 (reserved), B|C|D = 40 hashed bits.
        Isid(u64::from(Self::TYPE_RANDOM) << 46 | bits40)
    }

    pub fn value(self) -> u64 {
        self.0
    }

    /// The six bytes sent in the login request.
    pub fn to_bytes(self) -> [u8; 6] {
        let b = self.0.to_be_bytes();
        [b[2], b[3], b[4], b[5], b[6], b[7]]
    }

    /// The T (type) field, the two top bits.
    pub fn type_field(self) -> u8 {
        (self.0 >> 46) as u8 & 0b11
    }
}

impl fmt::Display for Isid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:012x}", self.0)
    }
}

impl FromStr for Isid {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Isid, IdentityError> {
        let hex = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if hex.is_empty() || hex.len() > 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdentityError::BadIsid(s.to_string()));
        }
        u64::from_str_radix(hex, 16)
            .ok()
            .and_then(Isid::new)
            .ok_or_else(|| IdentityError::BadIsid(s.to_string()))
    }
}

/// 64-bit FNV-1a: tiny, fixed, and stable forever.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nofile() -> PathBuf {
        PathBuf::from("/nonexistent/keyfence/initiatorname.iscsi")
    }

    #[test]
    fn resolution_order() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            "## comment\n#InitiatorName=iqn.2000-01.com.bad:x\nInitiatorName=iqn.1993-08.org.debian:01:abc\n",
        )
        .unwrap();
        let host = || Some("Node_1".to_string());
        let r = resolve_with(
            Some("IQN.2001-04.com.Example:a"),
            Some("iqn.2002-01.org.e:b"),
            f.path(),
            host,
        )
        .unwrap();
        assert_eq!(r.name, "iqn.2001-04.com.example:a");
        assert_eq!(r.source, NameSource::Explicit);
        let r = resolve_with(None, Some("iqn.2002-01.org.e:b"), f.path(), host).unwrap();
        assert_eq!(r.source, NameSource::Environment);
        let r = resolve_with(None, Some("  "), f.path(), host).unwrap();
        assert_eq!(r.name, "iqn.1993-08.org.debian:01:abc");
        assert_eq!(r.source, NameSource::File(f.path().to_path_buf()));
        let r = resolve_with(None, None, &nofile(), host).unwrap();
        assert_eq!(r.name, "iqn.2026-11.io.keyfence.host:node-1");
        assert_eq!(r.source, NameSource::HostName);
        assert_eq!(
            resolve_with(None, None, &nofile(), || None),
            Err(IdentityError::NoHostName)
        );
        std::fs::write(f.path(), "InitiatorName=bogus\n").unwrap();
        assert!(matches!(
            resolve_with(None, None, f.path(), host),
            Err(IdentityError::File { .. })
        ));
    }

    #[test]
    fn name_rules() {
        assert!(validate_name("eui.0123456789ABCDEF").is_ok());
        assert!(validate_name("naa.52004567ba64678d").is_ok());
        assert_eq!(validate_name(""), Err(IdentityError::Empty));
        assert!(matches!(
            validate_name("foo.bar"),
            Err(IdentityError::BadPrefix(_))
        ));
        assert!(matches!(
            validate_name("iqn.2001-13.com.x"),
            Err(IdentityError::BadIqn(_))
        ));
        assert!(matches!(
            validate_name("iqn.2001-04"),
            Err(IdentityError::BadIqn(_))
        ));
        assert!(matches!(
            validate_name("iqn.2001-04.com x"),
            Err(IdentityError::BadChar(_, ' '))
        ));
        assert!(matches!(
            validate_name("eui.0123"),
            Err(IdentityError::BadHexName(_))
        ));
        let long = format!("iqn.2001-04.com.x:{}", "a".repeat(220));
        assert!(matches!(
            validate_name(&long),
            Err(IdentityError::TooLong(_))
        ));
    }

    #[test]
    fn isid_is_random_type_and_stable() {
        let a = Isid::derive("iqn.2001-04.com.x:a", "127.0.0.1:3260", "iqn.t:1");
        assert_eq!(a.type_field(), Isid::TYPE_RANDOM);
        assert_eq!(a.to_bytes()[0], 0x80, "T=10, A=0");
        // Same inputs, same ISID (case-insensitively); different path, different ISID.
        assert_eq!(
            a,
            Isid::derive("IQN.2001-04.com.x:A", "127.0.0.1:3260", "iqn.t:1")
        );
        assert_ne!(
            a,
            Isid::derive("iqn.2001-04.com.x:a", "127.0.0.1:3261", "iqn.t:1")
        );
        assert_ne!(
            a,
            Isid::derive("iqn.2001-04.com.x:a", "127.0.0.1:3260", "iqn.t:2")
        );
        // Pinned value: changing the derivation would silently move every
        // CLI user's registrations to a new nexus.
        assert_eq!(a.to_string(), "0x80d1df8753b2");
    }

    #[test]
    fn isid_parse() {
        assert_eq!(
            "0x80123456789a".parse::<Isid>().unwrap().value(),
            0x8012_3456_789a
        );
        assert_eq!("1".parse::<Isid>().unwrap().value(), 1);
        assert!("0x1234567890abc".parse::<Isid>().is_err());
        assert!("xyz".parse::<Isid>().is_err());
        assert!("".parse::<Isid>().is_err());
    }
}
