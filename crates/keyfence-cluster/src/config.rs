//! The `[cluster]` table of the server configuration.

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
        }
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
}
