//! What the target serves: targets, their portal groups and LUNs, and the
//! limits that bound what an initiator can make the server hold.
//!
//! The file format is TOML. Unknown keys are rejected so that a typo is an
//! error, not a silently ignored setting:
//!
//! ```toml
//! data_dir = "keyfence-data"          # relative paths of LUN files start here
//! admin_socket = "keyfence-data/keyfence.sock" # `keyfence status`/`reload`; this is the default
//!
//! [limits]
//! max_sessions = 64                   # normal + discovery sessions, all targets
//! max_connections = 128               # logged-in TCP connections, all portals
//! max_login_connections = 128         # connections still logging in
//! max_login_connections_per_source = 32 # ... from one source address (IPv6: one /64)
//! first_pdu_timeout_secs = 5          # a new connection must speak by then
//! max_cmds_per_session = 128          # MaxCmdSN - ExpCmdSN + 1
//! max_recv_data_segment_length = 262144
//! max_burst_length = 1048576
//! first_burst_length = 262144
//! max_outstanding_r2t = 1
//! nop_in_interval_secs = 30           # ping an idle connection after this long; 0 = never
//! nop_in_timeout_secs = 15            # drop it if the ping is not answered
//! data_out_timeout_secs = 30          # drop a connection whose write data stalls
//! max_buffered_bytes = "4G"           # read and write data held for all sessions; default RAM/4
//!
//! [discovery_chap]                    # optional: CHAP for SendTargets sessions too
//! user = "discoverer"
//! secret = "disc-secret-0123"
//!
//! [[target]]
//! name = "iqn.2026-11.io.keyfence:default"
//! portals = ["127.0.0.1:3260", "127.0.0.1:3261"]   # portal groups with TPGT 1, 2
//!
//! [target.chap]                       # optional: initiators must log in with CHAP
//! user = "alice"                      # the CHAP_N the initiator gives
//! secret = "alice-secret-42"          # 12 to 255 bytes (RFC 7143: 96+ random bits)
//! mutual_user = "target1"             # optional mutual CHAP: the target proves
//! mutual_secret = "target1-secret-7"  # itself with these; a different secret
//!
//! [[target.acl]]                     # who may log in; or `open = true` on the
//! initiator = "iqn.1994-05.com.redhat:host1"   # target for any initiator
//! [target.acl.chap]                   # optional: this initiator's own CHAP,
//! user = "host1"                      # instead of [target.chap]
//! secret = "host1-secret-77"
//! [[target.acl.lun]]                  # optional: only these LUNs, renumbered;
//! lun = 0                             # the LUN number the initiator sees
//! target_lun = 0                      # the [[target.lun]] id behind it
//! read_only = true                    # this initiator may not write
//!
//! [[target.acl]]
//! initiator = "iqn.2026-11.io.example:rack1-*"  # trailing '*': a name prefix
//!
//! [[target.lun]]
//! id = 0
//! path = "lun0.img"                   # or: device = "/dev/sdX"; absolute or
//!                                     # relative to data_dir, no '..'
//! size = "1G"                         # for a file that does not exist yet
//! block_size = 512                    # 512 or 4096
//! read_only = false
//! serial = "kf0001"                   # optional; VPD 80h
//! naa = "6001405f0000000000000000000000a1"  # optional; VPD 83h NAA designator
//! ```

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keyfence_iscsi::chap::ChapCredential;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The name `keyfence serve` exports when it is not told otherwise.
pub const DEFAULT_TARGET_NAME: &str = "iqn.2026-11.io.keyfence:default";
/// The portal `keyfence serve` listens on when it is not told otherwise.
pub const DEFAULT_PORTAL: &str = "127.0.0.1:3260";
/// Size of the backing file `keyfence serve` creates when there is none.
pub const DEFAULT_LUN_SIZE: u64 = 1 << 30;
/// Directory the default backing file lives in.
pub const DEFAULT_DATA_DIR: &str = "keyfence-data";

/// File name of the admin socket in the data directory, by default.
pub const ADMIN_SOCKET_NAME: &str = "keyfence.sock";

/// Highest LUN the target can address (SAM-5 flat space addressing, 14 bits).
pub const MAX_LUN: u16 = 16383;

/// A configuration that could not be used. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{location}: {message}")]
    Syntax { location: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where relative LUN file paths are resolved. Relative to the working
    /// directory (or, when loaded from a file, to that file's directory).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub limits: Limits,
    /// CHAP required of discovery sessions; `None`: discovery is open.
    #[serde(default)]
    pub discovery_chap: Option<ChapConfig>,
    #[serde(rename = "target", default)]
    pub targets: Vec<TargetConfig>,
    /// The local admin socket (`keyfence status`, `keyfence reload`);
    /// default `keyfence.sock` in `data_dir`. A relative path is resolved
    /// like `data_dir`.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Cluster mode (`[cluster]`): this server is one gateway of several
    /// serving the same LUs, with their reservation state in etcd.
    /// `None`: single-node mode.
    #[serde(default)]
    pub cluster: Option<keyfence_cluster::ClusterConfig>,
    /// `metrics = "ADDR:PORT"`: serve Prometheus metrics at
    /// `http://ADDR:PORT/metrics`. `None`: no metrics endpoint.
    #[serde(default)]
    pub metrics: Option<String>,
    /// The address parsed from `metrics` by validation (or set directly,
    /// as `keyfence serve --metrics` does).
    #[serde(skip)]
    pub metrics_addr: Option<SocketAddr>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

/// Server-wide bounds on what clients can make the server hold.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Sessions (normal and discovery) across all targets.
    pub max_sessions: u32,
    /// TCP connections that completed their login (full feature phase),
    /// across all portals. Connections still logging in are counted
    /// separately, so idle sockets cannot take these places.
    pub max_connections: u32,
    /// Connections still logging in, across all portals. When all are
    /// taken, a new connection displaces one that has sent nothing yet.
    pub max_login_connections: u32,
    /// Connections still logging in from one source address (an IPv6
    /// source counts by its /64 prefix; the CHAP throttle groups the same
    /// way).
    pub max_login_connections_per_source: u32,
    /// Seconds a new connection may take to send its first Login Request.
    pub first_pdu_timeout_secs: u32,
    /// Command window per session: MaxCmdSN = ExpCmdSN + this - 1.
    pub max_cmds_per_session: u32,
    /// The most data the target accepts in one PDU (its
    /// MaxRecvDataSegmentLength declaration).
    pub max_recv_data_segment_length: u32,
    /// Upper bound offered for MaxBurstLength.
    pub max_burst_length: u32,
    /// Upper bound offered for FirstBurstLength.
    pub first_burst_length: u32,
    /// Upper bound offered for MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// Seconds of silence before the target pings with a NOP-In; 0 disables.
    pub nop_in_interval_secs: u32,
    /// Seconds a ping may stay unanswered before the connection is dropped.
    pub nop_in_timeout_secs: u32,
    /// Seconds a connection may take to finish its login.
    pub login_timeout_secs: u32,
    /// Seconds a write command may wait for a Data-Out the target asked
    /// for (or the rest of its unsolicited data); then the connection is
    /// dropped, as at ERL 0 the command cannot be recovered.
    pub data_out_timeout_secs: u32,
    /// Most command data the server holds for all sessions together:
    /// write data (collected for commands that have not run yet, and
    /// immediate data of commands waiting behind a CmdSN gap) and read
    /// data (being read or waiting to be sent). Writes beyond it end with
    /// TASK SET FULL; reads wait (the command window closes) until data
    /// has been sent. Default: a quarter of physical memory.
    pub max_buffered_bytes: ByteSize,
}

/// A quarter of physical memory, at least 256 MiB (16 GiB assumed when it
/// cannot be read): the default `max_buffered_bytes`.
pub fn default_max_buffered_bytes() -> u64 {
    const FLOOR: u64 = 256 << 20;
    let phys = physical_memory().unwrap_or(16 << 30);
    (phys / 4).max(FLOOR)
}

fn physical_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 64,
            max_connections: 128,
            max_login_connections: 128,
            max_login_connections_per_source: 32,
            first_pdu_timeout_secs: 5,
            max_cmds_per_session: 128,
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            max_outstanding_r2t: 1,
            nop_in_interval_secs: 30,
            nop_in_timeout_secs: 15,
            login_timeout_secs: 30,
            data_out_timeout_secs: 30,
            max_buffered_bytes: ByteSize(default_max_buffered_bytes()),
        }
    }
}

/// One iSCSI target.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// iSCSI name (iqn., eui. or naa. format).
    pub name: String,
    /// Listen addresses; the n-th (from 1) is portal group TPGT
    /// `first_tpgt` + n - 1.
    pub portals: Vec<String>,
    /// TPGT (and relative target port identifier) of the first portal;
    /// default 1. In cluster mode each gateway gives its portals TPGTs no
    /// other gateway uses.
    #[serde(default = "default_first_tpgt")]
    pub first_tpgt: u16,
    #[serde(rename = "lun", default)]
    pub luns: Vec<LunConfig>,
    /// CHAP required of normal sessions; `None`: AuthMethod=None.
    #[serde(default)]
    pub chap: Option<ChapConfig>,
    /// Any initiator may log in and sees every LUN. Required when there
    /// are no `[[target.acl]]` entries, so that an open target is a choice.
    #[serde(default)]
    pub open: bool,
    /// The initiators allowed to log in, with what each sees.
    #[serde(rename = "acl", default)]
    pub acls: Vec<AclConfig>,
    /// Addresses parsed from `portals` by validation.
    #[serde(skip)]
    pub portal_addrs: Vec<SocketAddr>,
}

impl TargetConfig {
    /// The portal groups of this target as (TPGT, address).
    pub fn portal_groups(&self) -> impl Iterator<Item = (u16, SocketAddr)> + '_ {
        self.portal_addrs.iter().enumerate().map(|(i, a)| {
            let tpgt = usize::from(self.first_tpgt) + i;
            (u16::try_from(tpgt).unwrap_or(u16::MAX), *a)
        })
    }
}

/// One initiator (or a family of them) allowed to log in to a target.
///
/// iSCSI names are case-insensitive (RFC 3722): `initiator` is compared
/// in lower case. A name ending in `*` matches every initiator whose name
/// starts with what comes before it; an exact entry wins over patterns,
/// and a longer pattern over a shorter one.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    pub initiator: String,
    /// CHAP this initiator must pass instead of the target's `[target.chap]`.
    #[serde(default)]
    pub chap: Option<ChapConfig>,
    /// The LUNs this initiator sees; `None`: every LUN under its own id.
    #[serde(rename = "lun", default)]
    pub luns: Option<Vec<LunMapping>>,
}

/// A LUN as one initiator sees it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LunMapping {
    /// The LUN number the initiator addresses.
    pub lun: u16,
    /// The `[[target.lun]]` id behind it; default: the same as `lun`.
    #[serde(default)]
    pub target_lun: Option<u16>,
    /// The initiator may read but not write.
    #[serde(default)]
    pub read_only: bool,
}

impl LunMapping {
    /// The target LUN id this mapping shows.
    pub fn target_lun(&self) -> u16 {
        self.target_lun.unwrap_or(self.lun)
    }
}

impl AclConfig {
    /// Does this entry cover `initiator` (any case)? `Some(rank)` when it
    /// does: higher ranks are more specific.
    pub fn matches(&self, initiator: &str) -> Option<usize> {
        let want = self.initiator.to_ascii_lowercase();
        let name = initiator.to_ascii_lowercase();
        match want.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix).then_some(prefix.len()),
            None => (name == want).then_some(usize::MAX),
        }
    }
}

impl TargetConfig {
    /// The ACL entry that decides for `initiator`: the exact one, else the
    /// longest matching pattern. `None`: not listed.
    pub fn acl_for(&self, initiator: &str) -> Option<&AclConfig> {
        self.acls
            .iter()
            .filter_map(|a| a.matches(initiator).map(|r| (r, a)))
            .max_by_key(|(r, _)| *r)
            .map(|(_, a)| a)
    }
}

fn default_first_tpgt() -> u16 {
    1
}

/// CHAP credentials (RFC 7143 section 12.1.3, MD5 only).
///
/// `user`/`secret` are what an initiator must authenticate with; the
/// optional `mutual_user`/`mutual_secret` are what the target answers with
/// when the initiator challenges it in turn (mutual CHAP). Secrets are
/// never printed: `Debug` redacts them.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChapConfig {
    /// CHAP name the initiator must present (CHAP_N).
    pub user: String,
    /// Secret shared with that initiator.
    pub secret: Secret,
    /// CHAP name the target answers a mutual challenge with.
    #[serde(default)]
    pub mutual_user: Option<String>,
    /// Secret the target answers a mutual challenge with.
    #[serde(default)]
    pub mutual_secret: Option<Secret>,
}

impl fmt::Debug for ChapConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChapConfig")
            .field("user", &self.user)
            .field("secret", &self.secret)
            .field("mutual_user", &self.mutual_user)
            .field("mutual_secret", &self.mutual_secret)
            .finish()
    }
}

impl ChapConfig {
    /// What an initiator must authenticate with.
    pub fn initiator_credential(&self) -> ChapCredential {
        ChapCredential::new(self.user.clone(), self.secret.expose().as_bytes())
    }

    /// What the target authenticates itself with (mutual CHAP), if set.
    pub fn target_credential(&self) -> Option<ChapCredential> {
        match (&self.mutual_user, &self.mutual_secret) {
            (Some(u), Some(s)) => Some(ChapCredential::new(u.clone(), s.expose().as_bytes())),
            _ => None,
        }
    }

    /// Shortest secret accepted: RFC 7143 section 12.1.3 requires IPsec for
    /// secrets with fewer than 96 random bits, which this target does not do.
    pub const MIN_SECRET_LEN: usize = 12;
    /// Longest secret accepted.
    pub const MAX_SECRET_LEN: usize = 255;

    fn validate(&self, what: &str) -> Result<(), ConfigError> {
        check_chap_name(what, "user", &self.user)?;
        check_secret(what, "secret", &self.secret)?;
        match (&self.mutual_user, &self.mutual_secret) {
            (None, None) => {}
            (Some(u), Some(s)) => {
                check_chap_name(what, "mutual_user", u)?;
                check_secret(what, "mutual_secret", s)?;
                if s == &self.secret {
                    return Err(invalid(format!(
                        "{what}: mutual_secret must differ from secret (RFC 7143 section 12.1.3)"
                    )));
                }
            }
            _ => {
                return Err(invalid(format!(
                    "{what}: mutual_user and mutual_secret must be given together"
                )))
            }
        }
        Ok(())
    }
}

fn check_chap_name(what: &str, key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what}: {key} must be 1-255 bytes without control characters"
        )));
    }
    Ok(())
}

fn check_secret(what: &str, key: &str, secret: &Secret) -> Result<(), ConfigError> {
    let n = secret.expose().len();
    if !(ChapConfig::MIN_SECRET_LEN..=ChapConfig::MAX_SECRET_LEN).contains(&n) {
        return Err(invalid(format!(
            "{what}: {key} is {n} bytes; it must be {}-{} bytes (RFC 7143 section 12.1.3 wants 96+ random bits)",
            ChapConfig::MIN_SECRET_LEN,
            ChapConfig::MAX_SECRET_LEN
        )));
    }
    Ok(())
}

/// A CHAP secret. `Debug` and `Display` never show it; [`Secret::expose`]
/// is the one way to read it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for computing CHAP responses.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One logical unit of a target.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LunConfig {
    pub id: u16,
    /// Backing file, relative to the data directory unless absolute. A
    /// path with a `..` component is refused: a relative path stays inside
    /// the data directory; an absolute one is an explicit choice.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Backing block device.
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// Size of the backing file if it has to be created.
    #[serde(default)]
    pub size: Option<ByteSize>,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default)]
    pub read_only: bool,
    /// Uncached I/O (`O_DIRECT`), as a clustered LU always does: reads go
    /// to the medium and writes leave this host's page cache before they
    /// are acknowledged (SYNCHRONIZE CACHE still flushes the device's
    /// cache). For initiators that cache themselves (a VM host), so data
    /// is not cached twice. The file system must support direct I/O.
    #[serde(default)]
    pub direct: bool,
    #[serde(default)]
    pub serial: Option<String>,
    /// NAA IEEE Registered Extended (6h) designator: 32 hex digits.
    #[serde(default)]
    pub naa: Option<String>,
}

fn default_block_size() -> u32 {
    512
}

/// Where a LUN's data lives, resolved against the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// A regular file; created sparse with `size` bytes when missing.
    File { path: PathBuf, size: u64 },
    /// An existing block device.
    Device(PathBuf),
}

impl LunConfig {
    /// Where this LUN's data lives. Call after [`Config::validate`].
    pub fn backing(&self, data_dir: &Path) -> Backing {
        match (&self.path, &self.device) {
            (_, Some(dev)) => Backing::Device(dev.clone()),
            (Some(p), None) => Backing::File {
                path: data_dir.join(p),
                size: self.size.map(|s| s.0).unwrap_or(DEFAULT_LUN_SIZE),
            },
            (None, None) => Backing::File {
                path: data_dir.join(format!("lun{}.img", self.id)),
                size: self.size.map(|s| s.0).unwrap_or(DEFAULT_LUN_SIZE),
            },
        }
    }

    /// The NAA designator as bytes, if configured (validated).
    pub fn naa_bytes(&self) -> Option<Vec<u8>> {
        self.naa.as_deref().and_then(|s| parse_hex(s).ok())
    }
}

/// A size in bytes, written either as an integer or as a string with a
/// binary unit: "4096", "512K", "64M", "1G", "2T", "1GiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits_end);
        if t.starts_with('-') {
            return Err(format!(
                "size '{s}' is negative; give a positive number of bytes or 512M, 1G, ..."
            ));
        }
        if num.is_empty() {
            return Err(format!("size '{s}' does not start with a number"));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("size '{s}' is too large"))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" | "kb" => 10,
            "m" | "mib" | "mb" => 20,
            "g" | "gib" | "gb" => 30,
            "t" | "tib" | "tb" => 40,
            _ => {
                return Err(format!(
                    "size '{s}' has unknown unit '{}' (use K, M, G or T; binary units)",
                    unit.trim()
                ))
            }
        };
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("size '{s}' is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes or a string like \"1G\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

fn parse_hex(s: &str) -> Result<Vec<u8>, ()> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if !s.len().is_multiple_of(2) {
        return Err(());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or(())
}

/// Is `name` a well-formed iSCSI name (RFC 7143 section 4.2.7.2, RFC 3722)?
pub fn check_iscsi_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("iSCSI name is empty".into());
    }
    if name.len() > 223 {
        return Err(format!("iSCSI name '{name}' is longer than 223 bytes"));
    }
    let lower = name.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("iqn.") {
        // iqn.yyyy-mm.reversed.domain[:anything]
        let date = rest.get(..7).unwrap_or("");
        let ok_date = date.len() == 7
            && date.as_bytes()[4] == b'-'
            && date
                .bytes()
                .enumerate()
                .all(|(i, b)| i == 4 || b.is_ascii_digit());
        if !ok_date || rest.as_bytes().get(7) != Some(&b'.') {
            return Err(format!(
                "iSCSI name '{name}' is not of the form iqn.yyyy-mm.naming-authority[:unique]"
            ));
        }
    } else if let Some(rest) = lower.strip_prefix("eui.") {
        if rest.len() != 16 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "iSCSI name '{name}': eui. must be followed by 16 hex digits"
            ));
        }
    } else if let Some(rest) = lower.strip_prefix("naa.") {
        if !(rest.len() == 16 || rest.len() == 32) || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "iSCSI name '{name}': naa. must be followed by 16 or 32 hex digits"
            ));
        }
    } else {
        return Err(format!(
            "iSCSI name '{name}' must start with iqn., eui. or naa."
        ));
    }
    if let Some(c) = lower
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':')))
    {
        return Err(format!(
            "iSCSI name '{name}' contains '{c}' (allowed: a-z 0-9 - . :)"
        ));
    }
    Ok(())
}

impl Config {
    /// Parse and validate TOML text. `origin` names the text in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let location = match e.span() {
                Some(span) => {
                    let before = text.get(..span.start).unwrap_or("");
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                    format!("{origin}:{line}:{col}")
                }
                None => origin.to_string(),
            };
            ConfigError::Syntax {
                location,
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        cfg.validate().map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(format!("{origin}: {m}")),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Read, parse and validate a config file. A relative `data_dir` is
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.to_path_buf(),
            err,
        })?;
        let mut cfg = Config::from_toml(&text, &path.display().to_string())?;
        if let Some(dir) = path.parent() {
            if cfg.data_dir.is_relative() {
                cfg.data_dir = dir.join(&cfg.data_dir);
            }
            if let Some(sock) = cfg.admin_socket.as_mut().filter(|s| s.is_relative()) {
                *sock = dir.join(&*sock);
            }
        }
        Ok(cfg)
    }

    /// The admin socket's path: `admin_socket`, else `keyfence.sock` in
    /// the data directory.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join(ADMIN_SOCKET_NAME))
    }

    /// Check every rule the types cannot express, and fill `portal_addrs`.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        self.limits.validate()?;
        if let Some(m) = &self.metrics {
            self.metrics_addr =
                Some(parse_metrics_addr(m).map_err(|e| invalid(format!("metrics: {e}")))?);
        }
        if let Some(s) = &self.admin_socket {
            // sockaddr_un holds 108 bytes with the terminating NUL.
            let n = s.as_os_str().len();
            if n == 0 || n > 107 {
                return Err(invalid(format!(
                    "admin_socket '{}' is {n} bytes; a Unix socket path must be 1-107 bytes",
                    s.display()
                )));
            }
        }
        if self.targets.is_empty() {
            return Err(invalid("no [[target]] configured"));
        }
        if let Some(c) = &self.discovery_chap {
            c.validate("discovery_chap")?;
        }
        let mut names = HashSet::new();
        for t in &mut self.targets {
            check_iscsi_name(&t.name).map_err(invalid)?;
            if let Some(c) = &t.chap {
                c.validate(&format!("target '{}' chap", t.name))?;
            }
            if !names.insert(t.name.to_ascii_lowercase()) {
                return Err(invalid(format!("target '{}' is configured twice", t.name)));
            }
            if t.portals.is_empty() {
                return Err(invalid(format!("target '{}' has no portals", t.name)));
            }
            if t.first_tpgt == 0
                || usize::from(t.first_tpgt) + t.portals.len() - 1 > usize::from(u16::MAX)
            {
                return Err(invalid(format!(
                    "target '{}': first_tpgt {} with {} portals leaves 1..=65535",
                    t.name,
                    t.first_tpgt,
                    t.portals.len()
                )));
            }
            let mut addrs = Vec::with_capacity(t.portals.len());
            for p in &t.portals {
                let a = parse_portal(p)
                    .map_err(|m| invalid(format!("target '{}': portal {m}", t.name)))?;
                if a.port() != 0 && addrs.contains(&a) {
                    return Err(invalid(format!(
                        "target '{}': portal {a} is listed twice",
                        t.name
                    )));
                }
                addrs.push(a);
            }
            t.portal_addrs = addrs;
            if t.luns.is_empty() {
                return Err(invalid(format!("target '{}' has no LUNs", t.name)));
            }
            let mut ids = HashSet::new();
            for l in &t.luns {
                let what = format!("target '{}' LUN {}", t.name, l.id);
                if l.id > MAX_LUN {
                    return Err(invalid(format!("{what}: LUN ids go up to {MAX_LUN}")));
                }
                if !ids.insert(l.id) {
                    return Err(invalid(format!("{what} is configured twice")));
                }
                if let Some(p) = &l.path {
                    check_lun_path(p).map_err(|m| invalid(format!("{what}: {m}")))?;
                }
                if l.path.is_some() && l.device.is_some() {
                    return Err(invalid(format!(
                        "{what}: give either path or device, not both"
                    )));
                }
                if l.device.is_some() && l.size.is_some() {
                    return Err(invalid(format!(
                        "{what}: size applies to files only; a device has its own size"
                    )));
                }
                if l.block_size != 512 && l.block_size != 4096 {
                    return Err(invalid(format!(
                        "{what}: block_size {} is not 512 or 4096",
                        l.block_size
                    )));
                }
                if let Some(ByteSize(s)) = l.size {
                    if s == 0 || s % u64::from(l.block_size) != 0 {
                        return Err(invalid(format!(
                            "{what}: size {s} is not a positive multiple of block_size {}",
                            l.block_size
                        )));
                    }
                }
                if let Some(serial) = &l.serial {
                    if serial.is_empty()
                        || serial.len() > 64
                        || !serial.bytes().all(|b| b.is_ascii_graphic())
                    {
                        return Err(invalid(format!(
                            "{what}: serial must be 1-64 printable ASCII characters without spaces"
                        )));
                    }
                }
                if let Some(naa) = &l.naa {
                    let b = parse_hex(naa)
                        .map_err(|_| invalid(format!("{what}: naa '{naa}' is not hex")))?;
                    if b.len() != 16 || b.first().map(|x| x >> 4) != Some(6) {
                        return Err(invalid(format!(
                            "{what}: naa must be 32 hex digits starting with 6 (IEEE Registered Extended)"
                        )));
                    }
                }
            }
            t.validate_acls()?;
        }
        self.check_chap_secrets_not_shared()?;
        if let Some(c) = &self.cluster {
            c.validate().map_err(|e| invalid(e.to_string()))?;
            self.check_own_portal_groups(c)?;
        }
        Ok(())
    }

    /// Cluster mode with `[[cluster.gateways]]`: every target is served on
    /// exactly the portal groups this gateway's entry lists (other
    /// gateways advertise them from that entry).
    fn check_own_portal_groups(
        &self,
        c: &keyfence_cluster::ClusterConfig,
    ) -> Result<(), ConfigError> {
        let Some(me) = c.this_gateway() else {
            return Ok(());
        };
        let want = me.portal_groups();
        for t in &self.targets {
            let have: Vec<(u16, SocketAddr)> = t.portal_groups().collect();
            if have != want {
                let show = |v: &[(u16, SocketAddr)]| {
                    v.iter()
                        .map(|(g, a)| format!("{a} (TPGT {g})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(invalid(format!(
                    "target '{}': portals {} differ from cluster.gateways entry {:?}: {}; in cluster mode every target is served on this gateway's listed portal groups",
                    t.name,
                    show(&have),
                    me.name,
                    show(&want)
                )));
            }
        }
        Ok(())
    }

    /// RFC 7143 section 12.1.3: a secret that authenticates initiators must
    /// not also authenticate a target, and the other way round.
    fn check_chap_secrets_not_shared(&self) -> Result<(), ConfigError> {
        let all = || {
            let disc = self
                .discovery_chap
                .as_ref()
                .map(|c| ("discovery_chap".to_string(), c));
            disc.into_iter()
                .chain(self.targets.iter().filter_map(|t| {
                    t.chap
                        .as_ref()
                        .map(|c| (format!("target '{}' chap", t.name), c))
                }))
                .chain(self.targets.iter().flat_map(|t| {
                    t.acls.iter().filter_map(move |a| {
                        a.chap
                            .as_ref()
                            .map(|c| (format!("target '{}' acl '{}' chap", t.name, a.initiator), c))
                    })
                }))
        };
        for (owner, c) in all() {
            let Some(mutual) = &c.mutual_secret else {
                continue;
            };
            if let Some((other, _)) = all().find(|(_, o)| &o.secret == mutual) {
                return Err(invalid(format!(
                    "{owner}: mutual_secret is also the secret initiators use for {other}; \
                     RFC 7143 section 12.1.3 forbids one secret for both directions"
                )));
            }
        }
        Ok(())
    }

    /// Every distinct listen address with the (target index, TPGT) pairs
    /// served there.
    pub fn listeners(&self) -> Vec<(SocketAddr, Vec<(usize, u16)>)> {
        let mut out: Vec<(SocketAddr, Vec<(usize, u16)>)> = Vec::new();
        for (ti, t) in self.targets.iter().enumerate() {
            for (tpgt, addr) in t.portal_groups() {
                match out.iter_mut().find(|(a, _)| *a == addr) {
                    Some((_, v)) => v.push((ti, tpgt)),
                    None => out.push((addr, vec![(ti, tpgt)])),
                }
            }
        }
        out
    }
}

impl TargetConfig {
    fn validate_acls(&self) -> Result<(), ConfigError> {
        let name = &self.name;
        if self.acls.is_empty() && !self.open {
            return Err(invalid(format!(
                "target '{name}' has no [[target.acl]] entries; add one per initiator allowed to log in, or `open = true` to let any initiator in"
            )));
        }
        if self.open && !self.acls.is_empty() {
            return Err(invalid(format!(
                "target '{name}': `open = true` and [[target.acl]] entries exclude each other; remove one"
            )));
        }
        let mut seen = HashSet::new();
        for a in &self.acls {
            let who = &a.initiator;
            let what = format!("target '{name}' acl '{who}'");
            match who.strip_suffix('*') {
                Some(prefix) => {
                    if prefix.contains('*') {
                        return Err(invalid(format!(
                            "{what}: '*' may only end a pattern (a name prefix)"
                        )));
                    }
                    if let Some(c) = prefix
                        .chars()
                        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':')))
                    {
                        return Err(invalid(format!(
                            "{what}: contains '{c}' (allowed: a-z 0-9 - . : and a final '*')"
                        )));
                    }
                }
                None => check_iscsi_name(who).map_err(|m| invalid(format!("{what}: {m}")))?,
            }
            if !seen.insert(who.to_ascii_lowercase()) {
                return Err(invalid(format!("{what} is listed twice")));
            }
            if let Some(c) = &a.chap {
                c.validate(&format!("{what} chap"))?;
            }
            let Some(maps) = &a.luns else { continue };
            if maps.is_empty() {
                return Err(invalid(format!("{what}: lun = [] maps no LUN")));
            }
            let mut numbers = HashSet::new();
            for m in maps {
                if m.lun > MAX_LUN {
                    return Err(invalid(format!("{what}: lun {} is above {MAX_LUN}", m.lun)));
                }
                if !numbers.insert(m.lun) {
                    return Err(invalid(format!("{what}: lun {} is mapped twice", m.lun)));
                }
                if !self.luns.iter().any(|l| l.id == m.target_lun()) {
                    return Err(invalid(format!(
                        "{what}: lun {} maps target_lun {}, which is not a [[target.lun]] id of this target",
                        m.lun,
                        m.target_lun()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Parse a portal address `IP:PORT` (IPv6 as `[addr]:port`), saying
/// precisely what is wrong with a bad one.
pub fn parse_portal(p: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = p.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = match p.rsplit_once(':') {
        Some((h, port)) if !h.is_empty() && (!h.contains(':') || h.starts_with('[')) => (h, port),
        _ => {
            return Err(format!(
                "'{p}' is not IP:PORT (IPv6 as [addr]:port, e.g. 127.0.0.1:3260)"
            ))
        }
    };
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if ip.parse::<std::net::IpAddr>().is_err() {
        return Err(format!(
            "'{p}': '{ip}' is not an IP address (give a numeric address, IPv6 as [addr]:port)"
        ));
    }
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{p}': port '{port}' is not a number"));
    }
    Err(format!("'{p}': port {port} is out of range (0-65535)"))
}

/// Parse the address of the metrics endpoint (`--metrics`, `metrics =`):
/// `IP:PORT` like a portal; port 0 picks a free port.
pub fn parse_metrics_addr(a: &str) -> Result<SocketAddr, String> {
    parse_portal(a)
}

/// A LUN `path` may be relative to the data directory or absolute (an
/// explicit choice of location); it must not climb out with `..`.
fn check_lun_path(p: &Path) -> Result<(), String> {
    if p.as_os_str().is_empty() {
        return Err("path is empty".to_string());
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!(
            "path '{}' must not contain '..' (relative paths stay inside data_dir; \
             give an absolute path for a file elsewhere)",
            p.display()
        ));
    }
    Ok(())
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        const SEG_MIN: u32 = 512;
        const SEG_MAX: u32 = (1 << 24) - 1;
        let seg = |name: &str, v: u32| {
            if (SEG_MIN..=SEG_MAX).contains(&v) {
                Ok(())
            } else {
                Err(invalid(format!(
                    "limits.{name} = {v} is outside {SEG_MIN}..={SEG_MAX} (RFC 7143)"
                )))
            }
        };
        seg(
            "max_recv_data_segment_length",
            self.max_recv_data_segment_length,
        )?;
        seg("max_burst_length", self.max_burst_length)?;
        seg("first_burst_length", self.first_burst_length)?;
        if self.first_burst_length > self.max_burst_length {
            return Err(invalid(
                "limits.first_burst_length must not exceed limits.max_burst_length",
            ));
        }
        let positive = |name: &str, v: u32, max: u32| {
            if v == 0 || v > max {
                Err(invalid(format!("limits.{name} = {v} is outside 1..={max}")))
            } else {
                Ok(())
            }
        };
        positive("max_sessions", self.max_sessions, 65535)?;
        positive("max_connections", self.max_connections, 65535)?;
        positive("max_cmds_per_session", self.max_cmds_per_session, 4096)?;
        positive("max_outstanding_r2t", self.max_outstanding_r2t, 65535)?;
        positive("login_timeout_secs", self.login_timeout_secs, 3600)?;
        positive("max_login_connections", self.max_login_connections, 65535)?;
        positive(
            "max_login_connections_per_source",
            self.max_login_connections_per_source,
            65535,
        )?;
        positive("first_pdu_timeout_secs", self.first_pdu_timeout_secs, 3600)?;
        positive("data_out_timeout_secs", self.data_out_timeout_secs, 3600)?;
        if self.max_buffered_bytes.0 < 1 << 20 {
            return Err(invalid(format!(
                "limits.max_buffered_bytes = {} is below 1M",
                self.max_buffered_bytes.0
            )));
        }
        if self.nop_in_interval_secs > 0 && self.nop_in_timeout_secs == 0 {
            return Err(invalid(
                "limits.nop_in_timeout_secs must be positive when nop_in_interval_secs is set",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "/srv/kf"
[limits]
max_sessions = 8
[[target]]
name = "iqn.2026-11.io.keyfence:a"
portals = ["127.0.0.1:3260", "127.0.0.1:3261"]
open = true
[[target.lun]]
id = 0
path = "a0.img"
size = "64M"
[[target.lun]]
id = 3
path = "/abs/a3.img"
size = 1048576
block_size = 4096
read_only = true
direct = true
serial = "A3"
naa = "6001405f0000000000000000000000a3"
[[target]]
name = "iqn.2026-11.io.keyfence:b"
portals = ["127.0.0.1:3261"]
open = true
[[target.lun]]
id = 0
device = "/dev/null"
"#;

    #[test]
    fn parses_a_full_config() {
        let c = Config::from_toml(GOOD, "t.toml").unwrap();
        assert_eq!(c.limits.max_sessions, 8);
        assert_eq!(c.limits.max_cmds_per_session, 128);
        assert_eq!(c.targets.len(), 2);
        let a = &c.targets[0];
        let pg: Vec<_> = a.portal_groups().collect();
        assert_eq!(pg[1], (2, "127.0.0.1:3261".parse().unwrap()));
        assert_eq!(
            a.luns[0].backing(&c.data_dir),
            Backing::File {
                path: "/srv/kf/a0.img".into(),
                size: 64 << 20
            }
        );
        assert_eq!(
            a.luns[1].backing(&c.data_dir),
            Backing::File {
                path: "/abs/a3.img".into(),
                size: 1 << 20
            }
        );
        assert_eq!(a.luns[1].naa_bytes().unwrap().len(), 16);
        assert!(a.luns[1].direct && !a.luns[0].direct);
        let e = err(&GOOD.replace("direct = true", "direct = \"yes\""));
        assert!(
            e.starts_with("c.toml:19:") && e.contains("expected a boolean") && !e.contains('\n'),
            "{e}"
        );
        assert_eq!(
            c.targets[1].luns[0].backing(&c.data_dir),
            Backing::Device("/dev/null".into())
        );
        let l = c.listeners();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].1, vec![(0, 2), (1, 1)]);
    }

    fn err(text: &str) -> String {
        Config::from_toml(text, "c.toml").unwrap_err().to_string()
    }

    #[test]
    fn metrics_address() {
        let t = |m: &str| {
            format!(
                "metrics = \"{m}\"\n[[target]]\nname = \"iqn.2026-11.io.keyfence:m\"\n\
                 portals = [\"127.0.0.1:0\"]\nopen = true\n[[target.lun]]\nid = 0\nsize = \"1M\"\n"
            )
        };
        let c = Config::from_toml(&t("127.0.0.1:9750"), "c.toml").unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9750".parse().unwrap()));
        assert_eq!(
            Config::from_toml(GOOD, "t.toml").unwrap().metrics_addr,
            None
        );
        assert_eq!(
            err(&t("localhost:9750")),
            "c.toml: metrics: 'localhost:9750': 'localhost' is not an IP address \
             (give a numeric address, IPv6 as [addr]:port)"
        );
        assert_eq!(
            err(&t("127.0.0.1:70000")),
            "c.toml: metrics: '127.0.0.1:70000': port 70000 is out of range (0-65535)"
        );
        assert_eq!(
            err(&t("9750")),
            "c.toml: metrics: '9750' is not IP:PORT (IPv6 as [addr]:port, e.g. 127.0.0.1:3260)"
        );
    }

    #[test]
    fn cluster_table_and_first_tpgt() {
        assert_eq!(Config::from_toml(GOOD, "t.toml").unwrap().cluster, None);
        let one = r#"
[[target]]
name = "iqn.2026-11.io.keyfence:a"
portals = ["127.0.0.1:3260", "127.0.0.1:3261"]
first_tpgt = 11
open = true
[[target.lun]]
id = 0
"#;
        let text = format!(
            "{one}[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\ngateway = \"gw1\"\nlease_ttl_secs = 7\n"
        );
        let c = Config::from_toml(&text, "t.toml").unwrap();
        let cl = c.cluster.as_ref().unwrap();
        assert_eq!((cl.gateway.as_str(), cl.lease_ttl_secs), ("gw1", 7));
        let pg: Vec<u16> = c.targets[0].portal_groups().map(|(t, _)| t).collect();
        assert_eq!(pg, vec![11, 12]);
        let e = err(&format!(
            "{one}[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\ngateway = \"gw1\"\nlease_ttl_secs = 1\n"
        ));
        assert!(
            e.contains("cluster.lease_ttl_secs: 1 is outside 2..=3600"),
            "{e}"
        );
        let e = err(&format!("{one}[cluster]\ngateway = \"gw1\"\n"));
        assert!(e.contains("endpoints"), "{e}");
        let e = err(&one.replace("first_tpgt = 11", "first_tpgt = 65535"));
        assert!(e.contains("first_tpgt 65535 with 2 portals"), "{e}");
        let e = err(&one.replace("first_tpgt = 11", "first_tpgt = 0"));
        assert!(e.contains("first_tpgt 0"), "{e}");
    }

    #[test]
    fn cluster_gateway_list_must_match_own_portals() {
        let one = r#"
[[target]]
name = "iqn.2026-11.io.keyfence:a"
portals = ["127.0.0.1:3260", "127.0.0.1:3261"]
first_tpgt = 11
open = true
[[target.lun]]
id = 0
[cluster]
endpoints = ["http://127.0.0.1:2379"]
gateway = "gw1"
[[cluster.gateways]]
name = "gw2"
portals = ["127.0.0.1:4260"]
first_tpgt = 1
"#;
        let mine = "[[cluster.gateways]]\nname = \"gw1\"\nportals = [\"127.0.0.1:3260\", \"127.0.0.1:3261\"]\nfirst_tpgt = 11\n";
        let c = Config::from_toml(&format!("{one}{mine}"), "t.toml").unwrap();
        let cl = c.cluster.as_ref().unwrap();
        assert_eq!(cl.gateways.len(), 2);
        assert_eq!(cl.this_gateway().unwrap().portal_groups().len(), 2);
        let e = err(&format!("{one}{}", mine.replace("3261", "3262")));
        assert!(
            e.contains("target 'iqn.2026-11.io.keyfence:a': portals 127.0.0.1:3260 (TPGT 11), 127.0.0.1:3261 (TPGT 12) differ"),
            "{e}"
        );
        let e = err(&format!("{one}{}", mine.replace("= 11", "= 12")));
        assert!(e.contains("differ from cluster.gateways entry"), "{e}");
        let e = err(one);
        assert!(e.contains("this gateway (\"gw1\") is not listed"), "{e}");
    }

    #[test]
    fn buffering_limits() {
        let d = Limits::default();
        assert_eq!(d.data_out_timeout_secs, 30);
        assert!(d.max_buffered_bytes.0 >= 256 << 20);
        let t = "[[target]]\nname = \"iqn.2026-11.io.keyfence:t\"\nportals = [\"127.0.0.1:0\"]\nopen = true\n\
                 [[target.lun]]\nid = 0\npath = \"l.img\"\nsize = \"1M\"\n";
        let c = Config::from_toml(
            &format!("[limits]\ndata_out_timeout_secs = 5\nmax_buffered_bytes = \"2G\"\n{t}"),
            "c.toml",
        )
        .unwrap();
        assert_eq!(c.limits.data_out_timeout_secs, 5);
        assert_eq!(c.limits.max_buffered_bytes.0, 2 << 30);
        let e = err(&format!("[limits]\ndata_out_timeout_secs = 0\n{t}"));
        assert!(e.contains("data_out_timeout_secs = 0"), "{e}");
        let e = err(&format!("[limits]\nmax_buffered_bytes = 4096\n{t}"));
        assert!(e.contains("max_buffered_bytes = 4096 is below 1M"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected_with_location() {
        let e = err("[limits]\nmax_sesions = 3\n");
        assert!(
            e.starts_with("c.toml:2:1: unknown field `max_sesions`"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn bad_values_get_precise_messages() {
        let base = |lun: &str| {
            format!(
                "[[target]]\nname = \"iqn.2026-11.io.keyfence:x\"\nportals = [\"127.0.0.1:1\"]\nopen = true\n[[target.lun]]\n{lun}\n"
            )
        };
        assert!(
            err(&base("id = 0\nblock_size = 1024")).contains("block_size 1024 is not 512 or 4096")
        );
        assert!(err(&base("id = 0\nsize = \"1X\"")).contains("unknown unit 'X'"));
        assert!(err(&base("id = 0\nsize = 1000")).contains("not a positive multiple"));
        assert!(
            err(&base("id = 0\npath = \"a\"\ndevice = \"b\"")).contains("either path or device")
        );
        assert!(err(&base("id = 16384")).contains("LUN ids go up to 16383"));
        assert!(err(&base("id = 0\nnaa = \"1234\"")).contains("naa must be"));
        let e = err("[[target]]\nname = \"foo\"\nportals = [\"127.0.0.1:1\"]\nopen = true\n");
        assert!(e.contains("must start with iqn."), "{e}");
        let e =
            err("[[target]]\nname = \"iqn.2026-11.a:b\"\nportals = [\"localhost\"]\nopen = true\n");
        assert!(e.contains("is not IP:PORT"), "{e}");
        let portal = |p: &str| {
            err(&format!(
                "[[target]]\nname = \"iqn.2026-11.a:b\"\nportals = [\"{p}\"]\nopen = true\n[[target.lun]]\nid = 0\n"
            ))
        };
        let e = portal("127.0.0.1:70000");
        assert!(e.contains("port 70000 is out of range (0-65535)"), "{e}");
        let e = portal("[::1]:65536");
        assert!(e.contains("port 65536 is out of range"), "{e}");
        let e = portal("127.0.0.1:http");
        assert!(e.contains("port 'http' is not a number"), "{e}");
        let e = portal("localhost:3260");
        assert!(e.contains("'localhost' is not an IP address"), "{e}");
        let e = portal("::1:3260");
        assert!(e.contains("is not IP:PORT"), "{e}");
        // A LUN path must not climb out of data_dir; absolute is explicit.
        for bad in [
            "../escape.img",
            "a/../../b.img",
            "/srv/../etc/x.img",
            "sub/..",
        ] {
            let e = err(&base(&format!("id = 0\npath = \"{bad}\"")));
            assert!(e.contains("must not contain '..'"), "{bad}: {e}");
        }
        assert!(err(&base("id = 0\npath = \"\"")).contains("path is empty"));
        let ok =
            "[[target]]\nname = \"iqn.2026-11.a:b\"\nportals = [\"127.0.0.1:1\"]\nopen = true\n\
                  [[target.lun]]\nid = 0\npath = \"sub/dir/x..y.img\"\n";
        Config::from_toml(ok, "c.toml").unwrap();
        let e = err("[limits]\nfirst_burst_length = 2000000\nmax_burst_length = 1000000\n");
        assert!(e.contains("first_burst_length must not exceed"), "{e}");
        assert!(err("").contains("no [[target]]"));
    }

    fn with_acl(acl: &str) -> String {
        format!(
            "[[target]]\nname = \"iqn.2026-11.io.keyfence:x\"\nportals = [\"127.0.0.1:1\"]\n\
             {acl}\n[[target.lun]]\nid = 0\n[[target.lun]]\nid = 4\n"
        )
    }

    #[test]
    fn acls_parse_match_and_map() {
        let c = Config::from_toml(
            &with_acl(
                "[[target.acl]]\ninitiator = \"IQN.2026-11.io.Example:Host1\"\n\
                 [target.acl.chap]\nuser = \"h1\"\nsecret = \"host1-secret-77\"\n\
                 [[target.acl.lun]]\nlun = 0\ntarget_lun = 4\nread_only = true\n\
                 [[target.acl]]\ninitiator = \"iqn.2026-11.io.example:*\"\n\
                 [[target.acl]]\ninitiator = \"iqn.2026-11.io.example:host*\"\n\
                 [[target.acl.lun]]\nlun = 4",
            ),
            "c.toml",
        )
        .unwrap();
        let t = &c.targets[0];
        // Exact (case-insensitive, RFC 3722) beats patterns.
        let a = t.acl_for("iqn.2026-11.io.example:host1").unwrap();
        assert_eq!(a.chap.as_ref().unwrap().user, "h1");
        let m = &a.luns.as_ref().unwrap()[0];
        assert_eq!((m.lun, m.target_lun(), m.read_only), (0, 4, true));
        // The longer pattern beats the shorter one.
        let a = t.acl_for("IQN.2026-11.IO.EXAMPLE:HOST2").unwrap();
        assert_eq!(a.initiator, "iqn.2026-11.io.example:host*");
        assert_eq!(a.luns.as_ref().unwrap()[0].target_lun(), 4);
        let a = t.acl_for("iqn.2026-11.io.example:db").unwrap();
        assert!(a.luns.is_none() && a.chap.is_none());
        assert!(t.acl_for("iqn.2026-11.io.other:host1").is_none());
    }

    #[test]
    fn acl_mistakes_get_one_line_errors() {
        let e = err(&with_acl(""));
        assert!(
            e.ends_with("target 'iqn.2026-11.io.keyfence:x' has no [[target.acl]] entries; add one per initiator allowed to log in, or `open = true` to let any initiator in"),
            "{e}"
        );
        let acl = |body: &str| err(&with_acl(&format!("[[target.acl]]\n{body}")));
        let e = acl("initiator = \"iqn.2026-11.a:b\"\n[[target.acl.lun]]\nlun = 1\ntarget_lun = 9");
        assert!(
            e.contains(
                "acl 'iqn.2026-11.a:b': lun 1 maps target_lun 9, which is not a [[target.lun]] id"
            ),
            "{e}"
        );
        let e = acl("initiator = \"iqn.2026-11.a:b\"\n[[target.acl.lun]]\nlun = 3");
        assert!(e.contains("maps target_lun 3"), "{e}");
        let e = acl("initiator = \"iqn.2026-11.a:b\"\n[[target.acl.lun]]\nlun = 0\n[[target.acl.lun]]\nlun = 0\ntarget_lun = 4");
        assert!(e.contains("lun 0 is mapped twice"), "{e}");
        let e = acl("initiator = \"host1\"");
        assert!(e.contains("must start with iqn."), "{e}");
        let e = acl("initiator = \"iqn.*.a:*\"");
        assert!(e.contains("'*' may only end a pattern"), "{e}");
        let e = acl("initiator = \"iqn.2026-11.a:b\"\ngroup = 1");
        assert!(e.contains("unknown field `group`"), "{e}");
        let e =
            acl("initiator = \"iqn.2026-11.a:b\"\n[[target.acl]]\ninitiator = \"IQN.2026-11.A:B\"");
        assert!(e.contains("is listed twice"), "{e}");
        let e = acl(
            "initiator = \"iqn.2026-11.a:b\"\n[target.acl.chap]\nuser = \"u\"\nsecret = \"short\"",
        );
        assert!(
            e.contains("acl 'iqn.2026-11.a:b' chap: secret is 5 bytes"),
            "{e}"
        );
        let e = err(&with_acl(
            "open = true\n[[target.acl]]\ninitiator = \"iqn.2026-11.a:b\"",
        ));
        assert!(e.contains("exclude each other"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn sizes() {
        assert_eq!("1G".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("512k".parse::<ByteSize>().unwrap().0, 512 << 10);
        assert_eq!("2TiB".parse::<ByteSize>().unwrap().0, 2 << 40);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert!("99999999999T".parse::<ByteSize>().is_err());
        assert!("G".parse::<ByteSize>().is_err());
        let e = "-5".parse::<ByteSize>().unwrap_err();
        assert!(e.contains("is negative"), "{e}");
    }

    #[test]
    fn iscsi_names() {
        assert!(check_iscsi_name("iqn.2026-11.io.keyfence:default").is_ok());
        assert!(check_iscsi_name("eui.02004567A425678D").is_ok());
        assert!(check_iscsi_name("naa.52004567BA64678D").is_ok());
        assert!(check_iscsi_name("iqn.26-11.io").is_err());
        assert!(check_iscsi_name("iqn.2026-11.io.kf:a b").is_err());
    }

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("config.rs")
            .lines()
            .skip_while(|l| *l != "//! ```toml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| l.strip_prefix("//! ").unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::from_toml(&text, "example").unwrap();
        assert_eq!(c.targets[0].portal_groups().count(), 2);
        assert_eq!(c.limits.nop_in_interval_secs, 30);
        let chap = c.targets[0].chap.as_ref().unwrap();
        assert_eq!(chap.initiator_credential().name, "alice");
        assert_eq!(chap.target_credential().unwrap().name, "target1");
        assert_eq!(c.discovery_chap.as_ref().unwrap().user, "discoverer");
    }

    #[test]
    fn the_readme_example_parses() {
        let readme = include_str!("../../../README.md");
        let block = readme
            .split("```toml")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .find(|b| b.contains("[[target.acl]]"))
            .expect("a TOML example with ACLs in the README");
        let c = Config::from_toml(block, "README.md").unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9750".parse().unwrap()));
        let t = &c.targets[0];
        assert_eq!(t.acls.len(), 3);
        let b = t.acl_for("IQN.1994-05.com.redhat:BACKUP").unwrap();
        assert_eq!(b.chap.as_ref().unwrap().user, "backup");
        assert!(t.acl_for("iqn.2026-11.io.example:web-7").is_some());
        assert!(t.acl_for("iqn.2026-11.io.example:db-7").is_none());
    }

    fn with_chap(chap: &str) -> String {
        format!(
            "[[target]]\nname = \"iqn.2026-11.io.keyfence:x\"\nportals = [\"127.0.0.1:1\"]\nopen = true\n\
             [target.chap]\n{chap}\n[[target.lun]]\nid = 0\n"
        )
    }

    #[test]
    fn chap_credentials() {
        let c = Config::from_toml(
            &with_chap("user = \"u\"\nsecret = \"0123456789ab\""),
            "c.toml",
        )
        .unwrap();
        let chap = c.targets[0].chap.as_ref().unwrap();
        assert_eq!(chap.initiator_credential().secret, b"0123456789ab");
        assert!(chap.target_credential().is_none());
        assert!(c.discovery_chap.is_none());

        let e = err(&with_chap("user = \"u\"\nsecret = \"short-sec01\""));
        assert!(
            e.ends_with("target 'iqn.2026-11.io.keyfence:x' chap: secret is 11 bytes; it must be 12-255 bytes (RFC 7143 section 12.1.3 wants 96+ random bits)"),
            "{e}"
        );
        assert!(!e.contains("short-sec01"));
        let long = "x".repeat(256);
        assert!(
            err(&with_chap(&format!("user = \"u\"\nsecret = \"{long}\"")))
                .contains("secret is 256 bytes")
        );
        assert!(err(&with_chap("user = \"\"\nsecret = \"0123456789ab\""))
            .contains("user must be 1-255 bytes"));
        assert!(err(&with_chap(
            "user = \"u\"\nsecret = \"0123456789ab\"\nmutual_user = \"t\""
        ))
        .contains("mutual_user and mutual_secret must be given together"));
        assert!(err(&with_chap(
            "user = \"u\"\nsecret = \"0123456789ab\"\nmutual_user = \"t\"\nmutual_secret = \"0123456789ab\""
        ))
        .contains("mutual_secret must differ from secret"));
        assert!(err(&with_chap(
            "user = \"u\"\nsecret = \"0123456789ab\"\nsecrt = 1"
        ))
        .contains("unknown field `secrt`"));
        // A target secret that is another's initiator secret.
        let e = err(&format!(
            "[discovery_chap]\nuser = \"d\"\nsecret = \"discovery-secret\"\n{}",
            with_chap(
                "user = \"u\"\nsecret = \"0123456789ab\"\nmutual_user = \"t\"\nmutual_secret = \"discovery-secret\""
            )
        ));
        assert!(
            e.contains("mutual_secret is also the secret initiators use for discovery_chap"),
            "{e}"
        );
        assert!(!e.contains("discovery-secret"));
    }

    #[test]
    fn chap_secrets_are_redacted() {
        let c = Config::from_toml(
            &with_chap(
                "user = \"u\"\nsecret = \"initiator-pass\"\nmutual_user = \"t\"\nmutual_secret = \"target-pass-1\"",
            ),
            "c.toml",
        )
        .unwrap();
        let shown = format!("{c:?} {:#?}", c.targets[0].chap);
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(!shown.contains("initiator-pass"), "{shown}");
        assert!(!shown.contains("target-pass-1"), "{shown}");
        let cred = format!(
            "{:?}",
            c.targets[0].chap.as_ref().unwrap().initiator_credential()
        );
        assert!(!cred.contains("initiator-pass"), "{cred}");
    }
}
