//! The `[cluster]` table of the server configuration.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keys::{check_gateway_name, Keys};
use crate::Error;

/// Smallest lease TTL accepted. etcd raises shorter TTLs to its own
/// minimum (1.5 election timeouts, 2 s with the default timings) anyway.
pub const MIN_LEASE_TTL_SECS: u64 = 2;
pub const MAX_LEASE_TTL_SECS: u64 = 3600;

fn default_ttl() -> u64 {
    5
}
fn default_margin_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    2000
}
fn default_prefix() -> String {
    "/keyfence".into()
}

/// Cluster mode settings (`[cluster]` in the TOML configuration).
///
/// ```toml
/// [cluster]
/// endpoints = ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
/// gateway = "gw1"
/// lease_ttl_secs = 5        # default 5
/// safety_margin_ms = 1000   # default 1000: stop serving this long before the lease can expire
/// request_timeout_ms = 2000 # default 2000: bound on every etcd request
/// prefix = "/keyfence"      # default "/keyfence": root of every key
///
/// [[cluster.gateways]]      # optional: every gateway's portal groups
/// name = "gw1"              # (this one included), for SendTargets,
/// portals = ["127.0.0.1:3260"]  # REPORT TARGET PORT GROUPS and the
/// first_tpgt = 1            # target ports of ALL_TG_PT
/// [[cluster.gateways]]
/// name = "gw2"
/// portals = ["127.0.0.1:3261"]
/// first_tpgt = 2
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// This gateway's name, unique among live gateways.
    pub gateway: String,
    #[serde(default = "default_ttl")]
    pub lease_ttl_secs: u64,
    #[serde(default = "default_margin_ms")]
    pub safety_margin_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Every gateway's portal groups (`[[cluster.gateways]]`), this
    /// gateway's included. Empty: each gateway knows only its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<GatewayPortals>,
}

fn default_first_tpgt() -> u16 {
    1
}

/// One gateway's portal groups: the n-th portal (from 1) is portal group
/// `first_tpgt + n - 1`, whose TPGT is also its relative target port
/// identifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayPortals {
    pub name: String,
    /// `ip:port` (IPv6 as `[addr]:port`): addresses initiators can reach,
    /// not wildcards.
    pub portals: Vec<String>,
    #[serde(default = "default_first_tpgt")]
    pub first_tpgt: u16,
}

impl GatewayPortals {
    /// (TPGT, address) of each portal group. Call after
    /// [`ClusterConfig::validate`]; unparsable addresses are left out.
    pub fn portal_groups(&self) -> Vec<(u16, SocketAddr)> {
        self.portals
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let tpgt = u16::try_from(usize::from(self.first_tpgt) + i).ok()?;
                Some((tpgt, p.parse().ok()?))
            })
            .collect()
    }

    fn validate(&self, i: usize) -> Result<(), String> {
        let at = format!("cluster.gateways[{i}]");
        check_gateway_name(&self.name).map_err(|r| format!("{at}.name: {r}"))?;
        let at = format!("cluster.gateways[{i}] ({})", self.name);
        if self.portals.is_empty() {
            return Err(format!("{at}.portals: at least one portal is needed"));
        }
        if self.first_tpgt == 0
            || usize::from(self.first_tpgt) + self.portals.len() - 1 > usize::from(u16::MAX)
        {
            return Err(format!(
                "{at}.first_tpgt: {} with {} portals leaves 1..=65535",
                self.first_tpgt,
                self.portals.len()
            ));
        }
        for p in &self.portals {
            let a: SocketAddr = p
                .parse()
                .map_err(|_| format!("{at}.portals: {p:?} is not ip:port (IPv6 as [addr]:port)"))?;
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(format!(
                    "{at}.portals: {p:?} must be an address and port initiators can reach, not a wildcard"
                ));
            }
        }
        Ok(())
    }
}

impl ClusterConfig {
    /// A configuration with the defaults for everything optional.
    pub fn new(endpoints: Vec<String>, gateway: &str) -> ClusterConfig {
        ClusterConfig {
            endpoints,
            gateway: gateway.to_owned(),
            lease_ttl_secs: default_ttl(),
            safety_margin_ms: default_margin_ms(),
            request_timeout_ms: default_timeout_ms(),
            prefix: default_prefix(),
            gateways: Vec::new(),
        }
    }

    /// This gateway's entry in `gateways`, if the list is given.
    pub fn this_gateway(&self) -> Option<&GatewayPortals> {
        self.gateways.iter().find(|g| g.name == self.gateway)
    }

    /// Parse the body of a `[cluster]` table and validate it.
    pub fn from_toml(text: &str) -> Result<ClusterConfig, Error> {
        let c: ClusterConfig = toml::from_str(text).map_err(|e| {
            // toml's messages span lines (a source excerpt); keep the
            // first line, which names the problem.
            let msg = e.message().lines().next().unwrap_or("bad TOML").to_owned();
            Error::Config(msg)
        })?;
        c.validate()?;
        Ok(c)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }

    pub fn safety_margin(&self) -> Duration {
        Duration::from_millis(self.safety_margin_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }

    /// Check every field; the error is one line naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.endpoints.is_empty() {
            return bad("cluster.endpoints: at least one etcd endpoint is needed".into());
        }
        for e in &self.endpoints {
            check_endpoint(e)
                .map_err(|r| Error::Config(format!("cluster.endpoints: {e:?}: {r}")))?;
        }
        check_gateway_name(&self.gateway)
            .map_err(|r| Error::Config(format!("cluster.gateway: {r}")))?;
        if !(MIN_LEASE_TTL_SECS..=MAX_LEASE_TTL_SECS).contains(&self.lease_ttl_secs) {
            return bad(format!(
                "cluster.lease_ttl_secs: {} is outside {MIN_LEASE_TTL_SECS}..={MAX_LEASE_TTL_SECS}",
                self.lease_ttl_secs
            ));
        }
        let ttl_ms = self.lease_ttl_secs * 1000;
        if self.safety_margin_ms < 100 || self.safety_margin_ms * 2 > ttl_ms {
            return bad(format!(
                "cluster.safety_margin_ms: {} must be at least 100 and at most half the lease TTL ({} ms)",
                self.safety_margin_ms,
                ttl_ms / 2
            ));
        }
        // A keep-alive is sent every TTL/3; one must be able to complete
        // before the serving deadline (TTL - margin) passes.
        if self.request_timeout_ms < 100 || self.request_timeout_ms > ttl_ms / 3 * 2 {
            return bad(format!(
                "cluster.request_timeout_ms: {} must be at least 100 and at most two thirds of the lease TTL ({} ms)",
                self.request_timeout_ms,
                ttl_ms / 3 * 2
            ));
        }
        Keys::check_prefix(&self.prefix)
            .map_err(|r| Error::Config(format!("cluster.prefix: {r}")))?;
        self.validate_gateways().map_err(Error::Config)
    }

    /// Names, TPGTs (= relative target port identifiers) and addresses
    /// unique cluster-wide; this gateway listed.
    fn validate_gateways(&self) -> Result<(), String> {
        if self.gateways.is_empty() {
            return Ok(());
        }
        let mut names = HashMap::new();
        let mut tpgts: HashMap<u16, &str> = HashMap::new();
        let mut addrs: HashMap<SocketAddr, &str> = HashMap::new();
        for (i, g) in self.gateways.iter().enumerate() {
            g.validate(i)?;
            if names.insert(g.name.as_str(), i).is_some() {
                return Err(format!(
                    "cluster.gateways: gateway {:?} is listed twice",
                    g.name
                ));
            }
            for (tpgt, addr) in g.portal_groups() {
                if let Some(other) = tpgts.insert(tpgt, &g.name) {
                    return Err(format!(
                        "cluster.gateways: TPGT {tpgt} (the relative target port identifier too) belongs to both {other:?} and {:?}; TPGTs must be unique cluster-wide",
                        g.name
                    ));
                }
                if let Some(other) = addrs.insert(addr, &g.name) {
                    return Err(format!(
                        "cluster.gateways: portal {addr} is listed for both {other:?} and {:?}",
                        g.name
                    ));
                }
            }
        }
        if self.this_gateway().is_none() {
            return Err(format!(
                "cluster.gateways: this gateway ({:?}) is not listed",
                self.gateway
            ));
        }
        Ok(())
    }
}

/// `http://host:port` with a numeric port. TLS (`https`) is not built in.
fn check_endpoint(e: &str) -> Result<(), String> {
    let rest = if let Some(r) = e.strip_prefix("http://") {
        r
    } else if e.starts_with("https://") {
        return Err("TLS endpoints are not supported by this build".into());
    } else {
        return Err("expected http://host:port".into());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or("missing :port")?;
    if host.is_empty() || host.contains('/') {
        return Err("expected http://host:port".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("bad port {port:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match ClusterConfig::from_toml(text) {
            Err(Error::Config(m)) => m,
            other => panic!("expected a config error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_round_trip() {
        let c = ClusterConfig::from_toml(
            "endpoints = [\"http://127.0.0.1:2379\"]\ngateway = \"gw-1\"\n",
        )
        .unwrap();
        assert_eq!(
            c,
            ClusterConfig::new(vec!["http://127.0.0.1:2379".into()], "gw-1")
        );
        assert_eq!(c.lease_ttl(), Duration::from_secs(5));
        assert_eq!(c.safety_margin(), Duration::from_millis(1000));
        assert_eq!(c.keys().gateway("gw-1"), "/keyfence/gateways/gw-1");
    }

    #[test]
    fn bad_fields_give_one_line_errors() {
        let base = "gateway = \"g\"\n";
        for (text, needle) in [
            ("endpoints = []\ngateway = \"g\"", "at least one"),
            (
                "endpoints = [\"127.0.0.1:2379\"]\ngateway = \"g\"",
                "expected http://",
            ),
            ("endpoints = [\"https://h:1\"]\ngateway = \"g\"", "TLS"),
            ("endpoints = [\"http://h:0\"]\ngateway = \"g\"", "bad port"),
            (
                "endpoints = [\"http://h:1\"]\ngateway = \"a/b\"",
                "cluster.gateway",
            ),
            (
                "endpoints = [\"http://h:1\"]\ngateway = \"\"",
                "cluster.gateway",
            ),
            (
                "endpoints = [\"http://h:1\"]\ngateway = \"g\"\nlease_ttl_secs = 1",
                "lease_ttl_secs",
            ),
            (
                "endpoints = [\"http://h:1\"]\ngateway = \"g\"\nsafety_margin_ms = 3000",
                "safety_margin_ms",
            ),
            (
                "endpoints = [\"http://h:1\"]\ngateway = \"g\"\nrequest_timeout_ms = 4000",
                "request_timeout_ms",
            ),
            (
                "endpoints = [\"http://h:1\"]\ngateway = \"g\"\nprefix = \"k\"",
                "cluster.prefix",
            ),
            (
                "endpoints = [\"http://h:1\"]\ngateway = \"g\"\nttl = 3",
                "unknown field",
            ),
            (base, "missing field"),
        ] {
            let m = err(text);
            assert!(m.contains(needle), "{text:?}: {m:?} lacks {needle:?}");
            assert!(!m.contains('\n'), "{m:?} spans lines");
        }
    }

    #[test]
    fn gateway_list() {
        let head = "endpoints = [\"http://h:1\"]\ngateway = \"a\"\n";
        let gw = |name: &str, portals: &str, first: u16| {
            format!(
                "[[gateways]]\nname = \"{name}\"\nportals = [{portals}]\nfirst_tpgt = {first}\n"
            )
        };
        let c = ClusterConfig::from_toml(&format!(
            "{head}{}{}",
            gw("a", "\"127.0.0.1:3260\", \"127.0.0.1:3261\"", 1),
            gw("b", "\"[::1]:3260\"", 3)
        ))
        .unwrap();
        assert_eq!(c.this_gateway().map(|g| g.name.as_str()), Some("a"));
        assert_eq!(
            c.gateways[1].portal_groups(),
            vec![(3, "[::1]:3260".parse().unwrap())]
        );
        assert_eq!(
            c.gateways[0]
                .portal_groups()
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        for (text, needle) in [
            (
                gw("b", "\"127.0.0.1:1\"", 1),
                "this gateway (\"a\") is not listed",
            ),
            (
                gw("a", "\"127.0.0.1:1\", \"127.0.0.1:2\"", 1) + &gw("b", "\"127.0.0.1:3\"", 2),
                "TPGT 2",
            ),
            (
                gw("a", "\"127.0.0.1:1\"", 1) + &gw("b", "\"127.0.0.1:1\"", 2),
                "portal 127.0.0.1:1 is listed for both",
            ),
            (
                gw("a", "\"127.0.0.1:1\"", 1) + &gw("a", "\"127.0.0.1:2\"", 2),
                "listed twice",
            ),
            (gw("a", "\"0.0.0.0:1\"", 1), "not a wildcard"),
            (gw("a", "\"127.0.0.1:0\"", 1), "not a wildcard"),
            (gw("a", "\"localhost:1\"", 1), "is not ip:port"),
            (gw("a", "", 1), "at least one portal"),
            (gw("a", "\"127.0.0.1:1\"", 0), "first_tpgt: 0"),
            (gw("a b", "\"127.0.0.1:1\"", 1), "cluster.gateways[0].name"),
        ] {
            let text = format!("{head}{text}");
            let m = err(&text);
            assert!(m.contains(needle), "{text:?}: {m:?} lacks {needle:?}");
            assert!(!m.contains('\n'), "{m:?} spans lines");
        }
    }
}
