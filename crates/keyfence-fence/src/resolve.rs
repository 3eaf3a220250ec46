//! Device resolution: what a device name given to a tool stands for.
//!
//! A device is an iSCSI URL (`iscsi://host[:port]/target-iqn/lun`, one
//! path) or the name of a multipath map in keyfence's configuration
//! (`/dev/mapper/` optional; the map's paths).
//!
//! One policy for every tool: **nothing is dropped silently**. A device that
//! is neither a valid URL nor a configured map, a map path that is not a
//! valid URL ([`Config::parse`] already refuses those), an empty list and a
//! device listed twice are errors naming the device. Paths that resolve but
//! cannot be reached at run time are the caller's business: multipath PR
//! marks them down and goes on with the others ([`crate::multipath`]),
//! fencing reports them per device.

use std::path::Path;

use keyfence_initiator::IscsiUrl;

use crate::config::{Config, MapConfig};
use crate::{Error, Result};

/// One device: a logical unit reached through one or more paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceDevice {
    /// As the user named it (URL, or map name without `/dev/mapper/`).
    pub name: String,
    pub paths: Vec<IscsiUrl>,
    /// The map's configuration when the device is a configured map.
    pub map: Option<MapConfig>,
}

/// Resolves device names, loading the configuration only when a name is
/// not a URL.
#[derive(Debug)]
pub struct Resolver<'a> {
    config_path: Option<&'a Path>,
    config: Option<Config>,
}

impl<'a> Resolver<'a> {
    /// A resolver that loads the configuration from `config_path` (or the
    /// default places, see [`Config::load`]) when it first needs it.
    pub fn new(config_path: Option<&'a Path>) -> Self {
        Resolver {
            config_path,
            config: None,
        }
    }

    /// A resolver over an already loaded configuration.
    pub fn with_config(config: Config) -> Self {
        Resolver {
            config_path: None,
            config: Some(config),
        }
    }

    fn config(&mut self) -> Result<&Config> {
        if self.config.is_none() {
            self.config = Some(Config::load(self.config_path)?);
        }
        // Just set above.
        self.config.as_ref().ok_or(Error::NoDevices)
    }

    /// Resolve one device name.
    pub fn device(&mut self, spec: &str) -> Result<FenceDevice> {
        let spec = spec.trim();
        if spec.starts_with("iscsi://") {
            let url = IscsiUrl::parse_full(spec).map_err(|source| Error::BadUrl {
                name: spec.to_string(),
                source,
            })?;
            return Ok(FenceDevice {
                name: spec.to_string(),
                paths: vec![url],
                map: None,
            });
        }
        let map_name = spec.strip_prefix("/dev/mapper/").unwrap_or(spec);
        let m = self
            .config()?
            .map(map_name)
            .cloned()
            .ok_or_else(|| Error::UnknownDevice(spec.to_string()))?;
        let paths = m
            .paths
            .iter()
            .map(|p| {
                IscsiUrl::parse_full(p).map_err(|source| Error::BadUrl {
                    name: format!("{map_name}: {p}"),
                    source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FenceDevice {
            name: m.name.clone(),
            paths,
            map: Some(m),
        })
    }

    /// Resolve a comma-separated device list (blank entries ignored); an
    /// empty list or a device named twice is an error.
    pub fn devices(&mut self, list: &str) -> Result<Vec<FenceDevice>> {
        let names: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if names.is_empty() {
            return Err(Error::NoDevices);
        }
        let mut out: Vec<FenceDevice> = Vec::with_capacity(names.len());
        for n in names {
            let dev = self.device(n)?;
            if out.iter().any(|d| d.name == dev.name) {
                return Err(Error::DuplicateDevice(dev.name));
            }
            out.push(dev);
        }
        Ok(out)
    }
}

/// Resolve a comma-separated device list with the configuration at
/// `config` (see [`Resolver`]).
pub fn resolve_devices(list: &str, config: Option<&Path>) -> Result<Vec<FenceDevice>> {
    Resolver::new(config).devices(list)
}

/// The other portals of a URL device's target, learnt with SendTargets
/// discovery through `url` (the URL itself first; a portal already in the
/// list is not repeated).
pub async fn discover_paths(
    url: &IscsiUrl,
    initiator_name: &str,
) -> std::result::Result<Vec<IscsiUrl>, (Vec<IscsiUrl>, keyfence_initiator::Error)> {
    let target = url.target.clone().unwrap_or_default();
    let lun = url.lun.unwrap_or(0);
    let scfg = keyfence_initiator::SessionConfig {
        initiator_name: Some(initiator_name.to_string()),
        ..keyfence_initiator::SessionConfig::default()
    };
    let mut urls = vec![url.clone()];
    let targets = match keyfence_initiator::discover(url, &scfg).await {
        Ok(t) => t,
        Err(e) => return Err((urls, e)),
    };
    for t in targets
        .iter()
        .filter(|t| t.name.eq_ignore_ascii_case(&target))
    {
        for (addr, port, _tpgt) in &t.portals {
            let mut u = url.clone();
            u.host = addr.clone();
            u.port = *port;
            let u = u.with_target(&target, lun);
            if !urls.iter().any(|x| x.host == u.host && x.port == u.port) {
                urls.push(u);
            }
        }
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_urls_and_rejects_garbage() {
        let d = resolve_devices(
            "iscsi://127.0.0.1:3260/iqn.2026-11.io.keyfence:a/0, iscsi://127.0.0.1:3261/iqn.2026-11.io.keyfence:b/1",
            None,
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].paths[0].lun, Some(1));
        assert!(matches!(
            resolve_devices(" , ", None),
            Err(Error::NoDevices)
        ));
        assert!(matches!(
            resolve_devices("iscsi://127.0.0.1/", None),
            Err(Error::BadUrl { .. })
        ));
        let twice = "iscsi://127.0.0.1/iqn.2026-11.io.keyfence:a/0,iscsi://127.0.0.1/iqn.2026-11.io.keyfence:a/0";
        assert!(resolve_devices(twice, None)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    #[test]
    fn resolves_maps_and_refuses_unknown_names() {
        let cfg = Config::parse(
            "[[multipath]]\nname = \"m\"\nreservation_key = \"0x5\"\npaths = [\"iscsi://127.0.0.1:3260/iqn.2026-11.io.keyfence:a/0\", \"iscsi://127.0.0.1:3261/iqn.2026-11.io.keyfence:a/0\"]\n",
        )
        .unwrap();
        let mut r = Resolver::with_config(cfg);
        let d = r.device("/dev/mapper/m").unwrap();
        assert_eq!((d.name.as_str(), d.paths.len()), ("m", 2));
        assert!(d.map.is_some());
        let e = r.device("nope").unwrap_err();
        assert_eq!(
            e.to_string(),
            "device \"nope\": neither an iSCSI URL nor a multipath map in the keyfence configuration"
        );
        assert!(matches!(
            r.devices("m,/dev/mapper/m"),
            Err(Error::DuplicateDevice(_))
        ));
    }
}
