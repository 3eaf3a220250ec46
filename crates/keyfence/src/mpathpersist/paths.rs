//! The paths of an mpathpersist DEVICE: resolved with keyfence-fence's
//! resolver (a configured map's paths, or an iSCSI URL plus the portals
//! SendTargets discovery reports), then logged in by
//! [`Multipath::open`], with mpathpersist's messages and exit statuses.

use keyfence_fence::config::{Config, MapConfig};
use keyfence_fence::multipath::{Multipath, PathEvent};
use keyfence_fence::{Error, IscsiLun, Resolver};
use keyfence_initiator::IscsiUrl;

use super::format::code;
use crate::persist::Output;

/// The name, the URLs a DEVICE stands for, and the map's configuration if
/// it is a configured map. Errors are reported to `out`; the exit status
/// comes back.
pub async fn resolve(
    device: &str,
    cfg: &Config,
    initiator_name: &str,
    out: &mut Output,
) -> Result<(String, Vec<IscsiUrl>, Option<MapConfig>), u8> {
    let dev = match Resolver::with_config(cfg.clone()).device(device) {
        Ok(d) => d,
        Err(Error::UnknownDevice(_)) => {
            out.stderr.push_str(&format!(
                "{device}: not a multipath map in the keyfence configuration, nor an iSCSI URL\n"
            ));
            return Err(code::FILE_ERROR);
        }
        Err(Error::BadUrl { source, .. }) => {
            out.stderr.push_str(&format!("{device}: {source}\n"));
            return Err(code::SYNTAX_ERROR);
        }
        Err(e) => {
            out.stderr.push_str(&format!("{device}: {e}\n"));
            return Err(code::FILE_ERROR);
        }
    };
    if let Some(m) = dev.map {
        return Ok((dev.name, dev.paths, Some(m)));
    }
    let Some(url) = dev.paths.into_iter().next() else {
        out.stderr.push_str(&format!("{device}: no paths\n"));
        return Err(code::FILE_ERROR);
    };
    let urls = match keyfence_fence::resolve::discover_paths(&url, initiator_name).await {
        Ok(urls) => urls,
        Err((urls, e)) => {
            out.stderr
                .push_str(&format!("{}: SendTargets discovery failed: {e}\n", url));
            urls
        }
    };
    Ok((url.to_string(), urls, None))
}

/// Log in on every path and report each path's fate (by verbosity, as
/// mpathpersist does).
pub async fn open(
    name: &str,
    urls: Vec<IscsiUrl>,
    initiator_name: &str,
    verbose: i64,
    out: &mut Output,
) -> Multipath<IscsiLun> {
    let (mp, events) = Multipath::open(name, urls, initiator_name).await;
    for ev in events {
        match ev {
            PathEvent::OtherLun { url } => out.stderr.push_str(&format!(
                "{name}: path {url} reaches another logical unit; ignored\n"
            )),
            PathEvent::Up {
                url,
                initiator_port: port,
                rtpi,
            } => {
                if verbose >= 3 {
                    out.stderr.push_str(&format!(
                        "{name}: path {url} up (initiator port {},i,0x{:012x}, relative target port {})\n",
                        port.name,
                        port.isid,
                        rtpi.map(|r| r.to_string()).unwrap_or_else(|| "unknown".into())
                    ));
                }
            }
            PathEvent::Down { url, error } => {
                if verbose >= 1 {
                    out.stderr
                        .push_str(&format!("{name}: path {url} down: {error}\n"));
                }
            }
        }
    }
    mp
}
