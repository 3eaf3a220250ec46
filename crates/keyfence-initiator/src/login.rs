//! Connecting: TCP connect, the login phase (RFC 7143 §6.3) with optional
//! CHAP (§12.1.3), and SendTargets discovery (§13.3, Appendix C).
//!
//! The login itself is `keyfence_iscsi::login::InitiatorLogin` (sans-IO: security
//! stage with AuthMethod None or CHAP, optionally mutual, then operational
//! negotiation of [`SessionConfig::prefs`]); this module feeds it over TCP
//! with a deadline and turns the result into a [`Session`].

use bytes::BytesMut;
use keyfence_iscsi::chap::ChapCredential;
use keyfence_iscsi::keys;
use keyfence_iscsi::login::{InitiatorLogin, InitiatorLoginConfig, InitiatorStep, LoginError};
use keyfence_iscsi::{Pdu, PduCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One target listed by SendTargets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    /// `(host, port, portal group tag)` for each portal offered; IPv6 hosts
    /// without brackets (as in [`IscsiUrl::host`]).
    pub portals: Vec<(String, u16, Option<u16>)>,
}

use crate::config::SessionConfig;
use crate::error::{Error, Result};
use crate::identity::{resolve_initiator_name, validate_name, Isid};
use crate::session::{LoggedIn, Session, SessionInfo};
use crate::url::IscsiUrl;

/// Log in to the target named by `url` and return the full-feature session.
pub async fn connect(url: &IscsiUrl, config: &SessionConfig) -> Result<Session> {
    let target = url.target()?.to_string();
    let logged = login_timed(url, config, Some(&target)).await?;
    Ok(Session::start(logged, config.limits.clone()))
}

/// Open a discovery session to the portal of `url`, ask `SendTargets=All`,
/// log out, and return the targets with their portals.
pub async fn discover(url: &IscsiUrl, config: &SessionConfig) -> Result<Vec<DiscoveredTarget>> {
    let logged = login_timed(url, config, None).await?;
    let session = Session::start(logged, config.limits.clone());
    let text = session
        .text(keys::build(&[(
            "SendTargets".to_string(),
            "All".to_string(),
        )]))
        .await;
    let _ = session.logout().await;
    let bad = |detail: String| Error::BadData {
        what: "SendTargets response",
        detail,
    };
    let found = keyfence_iscsi::text::parse_send_targets(&text?).map_err(|e| bad(e.to_string()))?;
    found
        .into_iter()
        .map(|t| {
            let portals = t
                .addresses
                .iter()
                .map(|(addr, tpgt)| {
                    // `addr` is host:port with IPv6 hosts in brackets.
                    let (host, port) = addr
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                        .ok_or_else(|| bad(format!("TargetAddress {addr:?}")))?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    Ok((host.to_string(), port, Some(*tpgt)))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(DiscoveredTarget {
                name: t.name,
                portals,
            })
        })
        .collect()
}

/// The initiator name a login with `config` uses.
pub fn initiator_name(config: &SessionConfig) -> Result<String> {
    Ok(match &config.initiator_name {
        Some(n) => validate_name(n)?,
        None => resolve_initiator_name(None)?.name,
    })
}

/// The ISID a login with `config` to `url` uses (configured, or derived
/// from the initiator name, portal and target name).
pub fn isid_for(url: &IscsiUrl, config: &SessionConfig) -> Result<Isid> {
    let name = initiator_name(config)?;
    Ok(config
        .isid
        .unwrap_or_else(|| Isid::derive(&name, &url.portal(), url.target.as_deref().unwrap_or(""))))
}

/// Most redirections (login status class 1) followed for one login.
const MAX_REDIRECTS: usize = 4;

/// Why one login attempt did not produce a session.
enum Attempt {
    Failed(Error),
    /// Status class 1 with a TargetAddress: try there.
    Redirected(String),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

async fn login_timed(
    url: &IscsiUrl,
    config: &SessionConfig,
    target: Option<&str>,
) -> Result<LoggedIn> {
    let follow = async {
        // The ISID belongs to the path the caller named, also when the
        // target sends us elsewhere: the I_T nexus must not change.
        let name = initiator_name(config)?;
        let isid = config
            .isid
            .unwrap_or_else(|| Isid::derive(&name, &url.portal(), target.unwrap_or("")));
        let mut portal = url.portal();
        for _ in 0..=MAX_REDIRECTS {
            match login(url, &portal, &name, isid, config, target).await {
                Ok(l) => return Ok(l),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Redirected(addr)) => {
                    let (hostport, _tpgt) = keyfence_iscsi::text::parse_target_address(&addr)
                        .map_err(|e| Error::protocol(format!("bad redirection {addr:?}: {e}")))?;
                    tracing::info!(from = %portal, to = %hostport, "login redirected");
                    portal = hostport;
                }
            }
        }
        Err(Error::protocol(format!(
            "more than {MAX_REDIRECTS} login redirections"
        )))
    };
    match tokio::time::timeout(config.login_timeout, follow).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: "login",
            after: config.login_timeout,
        }),
    }
}

async fn send(stream: &mut TcpStream, codec: &PduCodec, pdu: &Pdu) -> Result<()> {
    let mut out = BytesMut::new();
    codec
        .encode(pdu, &mut out)
        .map_err(|e| Error::protocol(format!("cannot encode login PDU: {e}")))?;
    stream.write_all(&out).await?;
    Ok(())
}

async fn recv(stream: &mut TcpStream, codec: &mut PduCodec, buf: &mut BytesMut) -> Result<Pdu> {
    loop {
        match codec.decode(buf) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(Error::protocol(format!("bad PDU during login: {e}"))),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(Error::ConnectionLost(
                "target closed the connection during login".into(),
            ));
        }
    }
}

async fn login(
    url: &IscsiUrl,
    portal: &str,
    name: &str,
    isid: Isid,
    config: &SessionConfig,
    target: Option<&str>,
) -> std::result::Result<LoggedIn, Attempt> {
    let name = name.to_string();
    let portal = portal.to_string();
    tracing::debug!(%portal, initiator = %name, %isid, ?target, "logging in");
    let mut cfg = InitiatorLoginConfig::new(name.clone(), isid.value(), target.map(str::to_string));
    cfg.prefs = config.prefs.clone();
    cfg.chap = url.user.as_ref().map(|u| {
        ChapCredential::new(
            u.clone(),
            url.secret.clone().unwrap_or_default().into_bytes(),
        )
    });
    cfg.chap_mutual = config
        .target_chap
        .as_ref()
        .map(|(n, s)| ChapCredential::new(n.clone(), s.clone().into_bytes()));
    let mut login = InitiatorLogin::new(cfg);

    let mut stream = TcpStream::connect(&portal)
        .await
        .map_err(|error| Error::Connect {
            portal: portal.clone(),
            error,
        })?;
    let _ = stream.set_nodelay(true);
    let mut codec = PduCodec::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let target_label = target.unwrap_or("discovery session").to_string();
    let mut next = login.start();
    let done = loop {
        send(&mut stream, &codec, &next).await?;
        let rsp = recv(&mut stream, &mut codec, &mut buf).await?;
        match login.step(&rsp) {
            Ok(InitiatorStep::Send(p)) => next = p,
            Ok(InitiatorStep::Complete(s)) => break s,
            Err(LoginError::Status {
                status,
                redirect: Some(addr),
            }) if status.class == 1 => return Err(Attempt::Redirected(addr)),
            Err(LoginError::Status { status, .. }) => {
                return Err(Error::Login {
                    target: target_label,
                    class: status.class,
                    detail: status.detail,
                }
                .into());
            }
            Err(LoginError::Protocol(m)) => return Err(Error::Protocol(m).into()),
            Err(e @ (LoginError::Auth(_) | LoginError::Negotiation(_))) => {
                return Err(Error::Negotiation(e.to_string()).into())
            }
        }
    };
    // A target that cannot do a digest we insist on (None not offered)
    // leaves digests off; refuse such a session rather than run unprotected.
    use keyfence_iscsi::params::Digest;
    for (what, prefs, on) in [
        (
            "HeaderDigest",
            &config.prefs.header_digest,
            done.params.header_digest,
        ),
        (
            "DataDigest",
            &config.prefs.data_digest,
            done.params.data_digest,
        ),
    ] {
        if !on && !prefs.is_empty() && !prefs.contains(&Digest::None) {
            return Err(Error::Negotiation(format!(
                "target does not accept {what}=CRC32C, and None was not offered"
            ))
            .into());
        }
    }
    tracing::debug!(params = ?done.params, tsih = done.tsih, "login complete");
    Ok(LoggedIn {
        stream,
        leftover: buf,
        params: done.params.clone(),
        info: SessionInfo {
            initiator_name: name,
            isid: done.isid,
            target_name: done.target_name.clone().unwrap_or_default(),
            tpgt: done.target_portal_group_tag,
            tsih: done.tsih,
            portal,
            discovery: target.is_none(),
        },
        cmd_sn: done.cmd_sn,
        exp_cmd_sn: done.exp_cmd_sn,
        max_cmd_sn: done.max_cmd_sn,
        exp_stat_sn: done.exp_stat_sn,
    })
}
