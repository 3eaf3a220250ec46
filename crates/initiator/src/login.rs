//! Connecting: TCP connect, the login phase (RFC 7143 §6.3) with optional
//! CHAP (§12.1.3), and SendTargets discovery (§13 / Appendix C).
//!
//! The login runs the security stage (AuthMethod=None, or CHAP when the URL
//! carries a user name), then the operational stage where the
//! `iscsi::params::Negotiation` of our [`SessionConfig::prefs`] is carried
//! out, then enters full feature phase and hands the connection to a
//! [`Session`]. Negotiation, key encoding and the CHAP response come from
//! the sans-IO `iscsi` crate; this module only sequences the PDUs.

use bytes::{Bytes, BytesMut};
use iscsi::chap;
use iscsi::keys;
use iscsi::params::{Negotiation, Role};
use iscsi::pdu::{LoginRequest, LoginResponse, Stage};
use iscsi::{Opcode, Pdu, PduCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::SessionConfig;
use crate::error::{Error, Result};
use crate::identity::{resolve_initiator_name, Isid};
use crate::session::{LoggedIn, Session, SessionInfo};
use crate::url::IscsiUrl;

/// Most login request/response round trips before giving up.
const MAX_LOGIN_EXCHANGES: usize = 32;
/// Keys handled here rather than by the operational negotiation.
const LOGIN_KEYS: &[&str] = &[
    "TargetPortalGroupTag",
    "TargetAlias",
    "TargetAddress",
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
    "TargetName",
    "InitiatorName",
    "InitiatorAlias",
    "SessionType",
];

/// One target listed by SendTargets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    /// `(address, port, portal group tag)` for each portal offered.
    pub portals: Vec<(String, u16, Option<u16>)>,
}

/// Log in to the target named by `url` and return the full-feature session.
pub async fn connect(url: &IscsiUrl, config: &SessionConfig) -> Result<Session> {
    let target = url.target()?.to_string();
    let logged = login_timed(url, config, Some(&target)).await?;
    Ok(Session::start(logged, config.limits.clone()))
}

/// Open a discovery session to the portal of `url`, ask `SendTargets=All`,
/// log out, and return the targets.
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
    parse_send_targets(&text?, url.port)
}

async fn login_timed(
    url: &IscsiUrl,
    config: &SessionConfig,
    target: Option<&str>,
) -> Result<LoggedIn> {
    match tokio::time::timeout(config.login_timeout, login(url, config, target)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: "login",
            after: config.login_timeout,
        }),
    }
}

struct Conn {
    stream: TcpStream,
    codec: PduCodec,
    rbuf: BytesMut,
}

impl Conn {
    async fn send(&mut self, pdu: &Pdu) -> Result<()> {
        let mut out = BytesMut::new();
        self.codec
            .encode(pdu, &mut out)
            .map_err(|e| Error::protocol(format!("cannot encode login PDU: {e}")))?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Pdu> {
        loop {
            match self.codec.decode(&mut self.rbuf) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(Error::protocol(format!("bad PDU during login: {e}"))),
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(Error::ConnectionLost(
                    "target closed the connection during login".into(),
                ));
            }
        }
    }
}

/// Where the login is.
struct LoginState {
    isid: u64,
    tsih: u16,
    cmd_sn: u32,
    exp_stat_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    tpgt: Option<u16>,
}

async fn login(url: &IscsiUrl, config: &SessionConfig, target: Option<&str>) -> Result<LoggedIn> {
    let name = match &config.initiator_name {
        Some(n) => crate::identity::validate_name(n)?,
        None => resolve_initiator_name(None)?.name,
    };
    let portal = url.portal();
    let isid = config
        .isid
        .unwrap_or_else(|| Isid::derive(&name, &portal, target.unwrap_or("")));
    tracing::debug!(%portal, initiator = %name, %isid, ?target, "logging in");
    let stream = TcpStream::connect(&portal).await?;
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        stream,
        codec: PduCodec::new(),
        rbuf: BytesMut::with_capacity(16 * 1024),
    };
    let mut st = LoginState {
        isid: isid.value(),
        tsih: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
        exp_cmd_sn: 1,
        max_cmd_sn: 1,
        tpgt: None,
    };
    let target_label = target.unwrap_or("discovery").to_string();
    let discovery = target.is_none();

    // First PDU: who we are and where we go.
    let mut first: Vec<(String, String)> = vec![
        ("InitiatorName".into(), name.clone()),
        (
            "SessionType".into(),
            if discovery { "Discovery" } else { "Normal" }.into(),
        ),
    ];
    if let Some(t) = target {
        first.push(("TargetName".into(), t.to_string()));
    }

    // ---- Security stage.
    let chap_cred = url.user.as_ref().map(|u| {
        chap::ChapCredential::new(
            u.clone(),
            url.secret.clone().unwrap_or_default().into_bytes(),
        )
    });
    let mut keys_out = first;
    keys_out.push((
        "AuthMethod".into(),
        if chap_cred.is_some() { "CHAP" } else { "None" }.into(),
    ));
    let mut transit = chap_cred.is_none();
    let mut chap_sent = false;
    let mut in_security = true;
    for _ in 0..MAX_LOGIN_EXCHANGES {
        let resp = exchange(
            &mut conn,
            &mut st,
            Stage::Security,
            transit,
            Stage::Operational,
            &keys_out,
            &target_label,
        )
        .await?;
        let pairs = parse_keys(&resp.data)?;
        note_login_keys(&mut st, &pairs);
        if let Some(m) = keys::get(&pairs, "AuthMethod") {
            let want = if chap_cred.is_some() { "CHAP" } else { "None" };
            if m != want {
                return Err(Error::Negotiation(format!(
                    "target chose AuthMethod={m}, we offered {want}"
                )));
            }
        }
        if resp.transit {
            if resp.nsg == Stage::FullFeature {
                return Err(Error::protocol("target skipped the operational stage"));
            }
            in_security = false;
            break;
        }
        keys_out = Vec::new();
        let Some(cred) = &chap_cred else {
            // Target wants to stay in security without CHAP: keep asking to move on.
            transit = true;
            continue;
        };
        if keys::get(&pairs, "AuthMethod").is_some() && !chap_sent {
            keys_out.push(("CHAP_A".into(), chap::CHAP_MD5.to_string()));
            continue;
        }
        if let (Some(a), Some(i), Some(c)) = (
            keys::get(&pairs, "CHAP_A"),
            keys::get(&pairs, "CHAP_I"),
            keys::get(&pairs, "CHAP_C"),
        ) {
            if a != chap::CHAP_MD5.to_string() {
                return Err(Error::Negotiation(format!(
                    "target chose CHAP_A={a}, only 5 (MD5) is supported"
                )));
            }
            let id = keys::parse_number(i)
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| Error::Negotiation(format!("bad CHAP_I={i}")))?;
            let challenge = keys::decode_binary(c)
                .filter(|c| !c.is_empty() && c.len() <= chap::MAX_CHALLENGE_LEN)
                .ok_or_else(|| Error::Negotiation("bad CHAP_C".into()))?;
            let r = chap::response(id, &cred.secret, &challenge);
            keys_out.push(("CHAP_N".into(), cred.name.clone()));
            keys_out.push(("CHAP_R".into(), keys::encode_hex(&r)));
            chap_sent = true;
            transit = true;
            continue;
        }
        if chap_sent {
            transit = true;
            continue;
        }
        return Err(Error::Negotiation(
            "target did not start CHAP after AuthMethod=CHAP".into(),
        ));
    }
    if in_security {
        return Err(Error::Negotiation("security stage did not finish".into()));
    }

    // ---- Operational stage.
    let mut neg = Negotiation::new(Role::Initiator, config.prefs.clone(), discovery);
    let mut out = neg.offers();
    let mut done = false;
    for _ in 0..MAX_LOGIN_EXCHANGES {
        let resp = exchange(
            &mut conn,
            &mut st,
            Stage::Operational,
            true,
            Stage::FullFeature,
            &out,
            &target_label,
        )
        .await?;
        let pairs = parse_keys(&resp.data)?;
        note_login_keys(&mut st, &pairs);
        let op: Vec<(String, String)> = pairs
            .into_iter()
            .filter(|(k, _)| !LOGIN_KEYS.contains(&k.as_str()))
            .collect();
        let answers = neg
            .process(&op)
            .map_err(|e| Error::Negotiation(e.to_string()))?;
        out = answers;
        out.extend(neg.offers());
        if resp.transit && resp.nsg == Stage::FullFeature {
            if !out.is_empty() || neg.has_pending() {
                return Err(Error::Negotiation(
                    "target ended the login with keys still open".into(),
                ));
            }
            done = true;
            break;
        }
    }
    if !done {
        return Err(Error::Negotiation(
            "operational stage did not finish".into(),
        ));
    }
    let params = neg.finish();
    tracing::debug!(?params, tsih = st.tsih, "login complete");
    let Conn { stream, rbuf, .. } = conn;
    Ok(LoggedIn {
        stream,
        leftover: rbuf,
        params,
        info: SessionInfo {
            initiator_name: name,
            isid: st.isid,
            target_name: target.unwrap_or("").to_string(),
            tpgt: st.tpgt,
            tsih: st.tsih,
            portal,
            discovery,
        },
        cmd_sn: st.cmd_sn,
        exp_cmd_sn: st.exp_cmd_sn,
        max_cmd_sn: st.max_cmd_sn,
        exp_stat_sn: st.exp_stat_sn,
    })
}

fn parse_keys(data: &[u8]) -> Result<Vec<(String, String)>> {
    keys::parse(data).map_err(|e| Error::protocol(format!("bad login text: {e}")))
}

fn note_login_keys(st: &mut LoginState, pairs: &[(String, String)]) {
    if let Some(t) = keys::get(pairs, "TargetPortalGroupTag") {
        st.tpgt = keys::parse_number(t).and_then(|n| u16::try_from(n).ok());
    }
}

/// Send one login request (split over C-bit continuations if long) and
/// collect the complete response (following the target's continuations).
#[allow(clippy::too_many_arguments)]
async fn exchange(
    conn: &mut Conn,
    st: &mut LoginState,
    csg: Stage,
    transit: bool,
    nsg: Stage,
    pairs: &[(String, String)],
    target_label: &str,
) -> Result<LoginResponse> {
    let text = keys::build(pairs);
    let chunks = if text.is_empty() {
        vec![Bytes::new()]
    } else {
        keys::chunks(&text, 8192)
    };
    let n = chunks.len();
    let mut resp = None;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let last = i + 1 == n;
        let req = LoginRequest {
            transit: transit && last,
            cont: !last,
            csg,
            nsg: if transit && last {
                nsg
            } else {
                Stage::Security
            },
            version_max: 0,
            version_min: 0,
            isid: st.isid,
            tsih: st.tsih,
            itt: 0,
            cid: 0,
            cmd_sn: st.cmd_sn,
            exp_stat_sn: st.exp_stat_sn,
            data: chunk,
        };
        conn.send(&req.to_pdu()).await?;
        let r = recv_login(conn, st, target_label).await?;
        if !last && !r.data.is_empty() {
            return Err(Error::protocol(
                "target answered a partial login request with text",
            ));
        }
        resp = Some(r);
    }
    let mut resp = resp.ok_or_else(|| Error::protocol("no login response"))?;
    // The target continues its text with C=1; ask for the rest with empty requests.
    let mut data = BytesMut::from(&resp.data[..]);
    let mut rounds = 0;
    while resp.cont {
        rounds += 1;
        if rounds > MAX_LOGIN_EXCHANGES || data.len() > keys::MAX_TEXT_LEN {
            return Err(Error::protocol("login response text too long"));
        }
        let req = LoginRequest {
            transit: false,
            cont: false,
            csg,
            nsg: Stage::Security,
            version_max: 0,
            version_min: 0,
            isid: st.isid,
            tsih: st.tsih,
            itt: 0,
            cid: 0,
            cmd_sn: st.cmd_sn,
            exp_stat_sn: st.exp_stat_sn,
            data: Bytes::new(),
        };
        conn.send(&req.to_pdu()).await?;
        resp = recv_login(conn, st, target_label).await?;
        data.extend_from_slice(&resp.data);
    }
    resp.data = data.freeze();
    Ok(resp)
}

async fn recv_login(
    conn: &mut Conn,
    st: &mut LoginState,
    target_label: &str,
) -> Result<LoginResponse> {
    let pdu = conn.recv().await?;
    if pdu.opcode_raw() != Opcode::LoginResponse as u8 {
        return Err(Error::protocol(format!(
            "expected a Login Response, got opcode 0x{:02x}",
            pdu.opcode_raw()
        )));
    }
    let r = LoginResponse::parse(&pdu)
        .map_err(|e| Error::protocol(format!("malformed Login Response: {e}")))?;
    if r.status_class != 0 {
        return Err(Error::Login {
            target: target_label.to_string(),
            class: r.status_class,
            detail: r.status_detail,
        });
    }
    if r.isid != st.isid {
        return Err(Error::protocol("Login Response for another ISID"));
    }
    if r.itt != 0 {
        return Err(Error::protocol("Login Response with a foreign ITT"));
    }
    st.exp_stat_sn = r.stat_sn.wrapping_add(1);
    st.exp_cmd_sn = r.exp_cmd_sn;
    st.max_cmd_sn = r.max_cmd_sn;
    st.tsih = r.tsih;
    Ok(r)
}

/// Parse SendTargets text: `TargetName=` starts a target, each following
/// `TargetAddress=addr[:port][,tpgt]` adds a portal. Duplicate keys are the
/// norm here, so this does not go through the unique-key parser.
pub fn parse_send_targets(data: &[u8], default_port: u16) -> Result<Vec<DiscoveredTarget>> {
    let bad = |d: String| Error::BadData {
        what: "SendTargets response",
        detail: d,
    };
    let mut out: Vec<DiscoveredTarget> = Vec::new();
    for item in data.split(|&b| b == 0).filter(|i| !i.is_empty()) {
        let s = std::str::from_utf8(item).map_err(|_| bad("text is not UTF-8".into()))?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| bad(format!("{s:?} has no '='")))?;
        match k {
            "TargetName" => out.push(DiscoveredTarget {
                name: v.to_string(),
                portals: Vec::new(),
            }),
            "TargetAddress" => {
                let t = out
                    .last_mut()
                    .ok_or_else(|| bad("TargetAddress before any TargetName".into()))?;
                let (addr, tpgt) = match v.rsplit_once(',') {
                    Some((a, g)) => (
                        a,
                        Some(
                            g.parse::<u16>()
                                .map_err(|_| bad(format!("bad portal group tag in {v:?}")))?,
                        ),
                    ),
                    None => (v, None),
                };
                let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
                    let (h, after) = rest
                        .split_once(']')
                        .ok_or_else(|| bad(format!("unclosed '[' in {v:?}")))?;
                    let port = match after.strip_prefix(':') {
                        Some(p) => p.parse().map_err(|_| bad(format!("bad port in {v:?}")))?,
                        None => default_port,
                    };
                    (h.to_string(), port)
                } else {
                    match addr.rsplit_once(':') {
                        Some((h, p)) => (
                            h.to_string(),
                            p.parse().map_err(|_| bad(format!("bad port in {v:?}")))?,
                        ),
                        None => (addr.to_string(), default_port),
                    }
                };
                t.portals.push((host, port, tpgt));
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_targets_text() {
        let text = b"TargetName=iqn.a:1\0TargetAddress=127.0.0.1:3261,1\0TargetAddress=[::1]:3262,2\0TargetName=iqn.b:2\0TargetAddress=host\0";
        let t = parse_send_targets(text, 3260).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "iqn.a:1");
        assert_eq!(
            t[0].portals,
            vec![
                ("127.0.0.1".to_string(), 3261, Some(1)),
                ("::1".to_string(), 3262, Some(2))
            ]
        );
        assert_eq!(t[1].portals, vec![("host".to_string(), 3260, None)]);
        assert!(parse_send_targets(b"TargetAddress=x:1,1\0", 3260).is_err());
        assert!(parse_send_targets(b"TargetName=a\0TargetAddress=x:y,1\0", 3260).is_err());
        assert!(parse_send_targets(b"garbage\0", 3260).is_err());
    }
}
