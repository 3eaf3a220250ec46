//! Initiator side of the login phase: [`InitiatorLogin`] produces Login
//! Requests and consumes the responses.

use bytes::BytesMut;
use thiserror::Error;

use super::{LoginStatus, SessionType, ISCSI_VERSION, MAX_LOGIN_PDUS};
use crate::chap::{self, ChapCredential, CHAP_MD5, MAX_CHALLENGE_LEN};
use crate::keys::{self, decode_binary, encode_hex, parse_number};
use crate::params::{Negotiation, NegotiationError, OperationalPrefs, Role, SessionParams};
use crate::pdu::{LoginRequest, LoginResponse, Opcode, Pdu, Stage};

/// Initiator-side login configuration.
#[derive(Debug, Clone)]
pub struct InitiatorLoginConfig {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// 48-bit ISID.
    pub isid: u64,
    /// Target to log in to; `None` for a discovery session.
    pub target_name: Option<String>,
    pub prefs: OperationalPrefs,
    /// Our CHAP name and secret, if the target may require CHAP.
    pub chap: Option<ChapCredential>,
    /// The target's name and secret for mutual CHAP (we challenge it).
    pub chap_mutual: Option<ChapCredential>,
    pub cid: u16,
    /// Initiator task tag for the login requests.
    pub itt: u32,
    /// CmdSN carried by the login requests (first CmdSN of the session).
    pub cmd_sn: u32,
}

impl InitiatorLoginConfig {
    /// A configuration with defaults for everything but the names.
    pub fn new(initiator_name: impl Into<String>, isid: u64, target_name: Option<String>) -> Self {
        InitiatorLoginConfig {
            initiator_name: initiator_name.into(),
            initiator_alias: None,
            isid,
            target_name,
            prefs: OperationalPrefs::default(),
            chap: None,
            chap_mutual: None,
            cid: 0,
            itt: 0,
            cmd_sn: 1,
        }
    }
}

/// Why an initiator's login failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LoginError {
    /// The target answered with a non-zero status.
    #[error("login rejected by target: {status}")]
    Status {
        status: LoginStatus,
        /// TargetAddress given with a redirection (class 1).
        redirect: Option<String>,
    },
    /// The target broke the protocol.
    #[error("target protocol error during login: {0}")]
    Protocol(String),
    /// CHAP could not be completed (target demanded CHAP without our
    /// credentials, bad challenge, or failed mutual authentication).
    #[error("authentication error: {0}")]
    Auth(String),
    /// Operational negotiation failed.
    #[error("negotiation error: {0}")]
    Negotiation(#[from] NegotiationError),
}

/// The outcome of a successful login, as seen by the initiator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitiatorSession {
    pub tsih: u16,
    pub isid: u64,
    pub cid: u16,
    pub session_type: SessionType,
    pub target_name: Option<String>,
    pub target_alias: Option<String>,
    pub target_portal_group_tag: Option<u16>,
    pub params: SessionParams,
    /// CmdSN for the first command (login CmdSN).
    pub cmd_sn: u32,
    /// ExpStatSN for the next PDU (final login StatSN + 1).
    pub exp_stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// What the initiator does after a Login Response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorStep {
    /// Send this request and wait for the next response.
    Send(Pdu),
    /// Login complete: full feature phase.
    Complete(Box<InitiatorSession>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IAuth {
    /// AuthMethod offered, waiting for the answer.
    Offered,
    /// CHAP_A sent.
    SentAlgorithm,
    /// CHAP_N/CHAP_R sent (with our challenge if mutual).
    SentResponse,
    Done,
}

/// The initiator side of one connection's login.
#[derive(Debug)]
pub struct InitiatorLogin {
    cfg: InitiatorLoginConfig,
    stage: Stage,
    auth: IAuth,
    neg: Negotiation,
    exp_stat_sn: u32,
    started: bool,
    partial: BytesMut,
    mutual_challenge: Option<(u8, Vec<u8>)>,
    tpgt: Option<u16>,
    target_alias: Option<String>,
    /// Answers to target offers to send with the next request.
    answers: Vec<(String, String)>,
    operational_sent: bool,
    pdus: u32,
}

impl InitiatorLogin {
    pub fn new(cfg: InitiatorLoginConfig) -> InitiatorLogin {
        let discovery = cfg.target_name.is_none();
        let neg = Negotiation::new(Role::Initiator, cfg.prefs.clone(), discovery);
        InitiatorLogin {
            cfg,
            stage: Stage::Security,
            auth: IAuth::Offered,
            neg,
            exp_stat_sn: 0,
            started: false,
            partial: BytesMut::new(),
            mutual_challenge: None,
            tpgt: None,
            target_alias: None,
            answers: Vec::new(),
            operational_sent: false,
            pdus: 0,
        }
    }

    fn request(&self, transit: Option<Stage>, pairs: &[(String, String)]) -> Pdu {
        LoginRequest {
            transit: transit.is_some(),
            cont: false,
            csg: self.stage,
            nsg: transit.unwrap_or(self.stage),
            version_max: ISCSI_VERSION,
            version_min: ISCSI_VERSION,
            isid: self.cfg.isid,
            tsih: 0,
            itt: self.cfg.itt,
            cid: self.cfg.cid,
            cmd_sn: self.cfg.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: keys::build(pairs),
        }
        .to_pdu()
    }

    /// The first Login Request.
    pub fn start(&mut self) -> Pdu {
        self.started = true;
        let mut pairs = vec![("InitiatorName".to_string(), self.cfg.initiator_name.clone())];
        if let Some(a) = &self.cfg.initiator_alias {
            pairs.push(("InitiatorAlias".to_string(), a.clone()));
        }
        match &self.cfg.target_name {
            Some(t) => {
                pairs.push(("SessionType".to_string(), "Normal".to_string()));
                pairs.push(("TargetName".to_string(), t.clone()));
            }
            None => pairs.push(("SessionType".to_string(), "Discovery".to_string())),
        }
        // With mutual CHAP we insist on authenticating the target: no None.
        let methods = match (&self.cfg.chap, &self.cfg.chap_mutual) {
            (Some(_), Some(_)) => "CHAP",
            (Some(_), None) => "CHAP,None",
            (None, _) => "None",
        };
        pairs.push(("AuthMethod".to_string(), methods.to_string()));
        // Ask to move on right away; a target wanting CHAP holds us back.
        self.request(Some(Stage::Operational), &pairs)
    }

    /// Handles one Login Response.
    pub fn step(&mut self, pdu: &Pdu) -> Result<InitiatorStep, LoginError> {
        let proto = |s: &str| LoginError::Protocol(s.to_string());
        if !self.started {
            return Err(proto("response before the first request"));
        }
        self.pdus += 1;
        if self.pdus > MAX_LOGIN_PDUS {
            return Err(proto("login does not converge"));
        }
        if pdu.opcode_raw() != Opcode::LoginResponse as u8 {
            return Err(proto("expected a Login Response"));
        }
        let rsp = LoginResponse::parse(pdu).map_err(|e| LoginError::Protocol(e.to_string()))?;
        self.exp_stat_sn = rsp.stat_sn.wrapping_add(1);
        if rsp.status_class != 0 {
            let redirect = keys::parse(&rsp.data)
                .ok()
                .and_then(|p| keys::get(&p, "TargetAddress").map(str::to_owned));
            return Err(LoginError::Status {
                status: LoginStatus::new(rsp.status_class, rsp.status_detail),
                redirect,
            });
        }
        if rsp.version_active != ISCSI_VERSION {
            return Err(proto("unsupported active version"));
        }
        if rsp.isid != self.cfg.isid || rsp.itt != self.cfg.itt {
            return Err(proto("ISID or ITT mismatch"));
        }
        if rsp.csg != self.stage {
            return Err(proto("CSG does not match our stage"));
        }
        if self.partial.len() + rsp.data.len() > keys::MAX_TEXT_LEN {
            return Err(proto("login text too long"));
        }
        self.partial.extend_from_slice(&rsp.data);
        if rsp.cont {
            // Ask for the rest with an empty request.
            return Ok(InitiatorStep::Send(self.request(None, &[])));
        }
        let text = std::mem::take(&mut self.partial).freeze();
        let pairs = keys::parse(&text).map_err(|e| LoginError::Protocol(e.to_string()))?;

        let mut rest = Vec::new();
        let mut chap: Vec<(String, String)> = Vec::new();
        let mut auth_method = None;
        for (k, v) in pairs {
            match k.as_str() {
                "TargetPortalGroupTag" => {
                    let t = parse_number(&v)
                        .filter(|t| *t <= 0xffff)
                        .ok_or_else(|| proto("bad TargetPortalGroupTag"))?;
                    self.tpgt = Some(t as u16);
                }
                "TargetAlias" => self.target_alias = Some(v),
                "AuthMethod" => auth_method = Some(v),
                k if k.starts_with("CHAP_") => chap.push((k.to_string(), v)),
                _ => rest.push((k, v)),
            }
        }
        let answers = self.neg.process(&rest)?;
        self.answers.extend(answers);

        if self.stage == Stage::Security {
            let next = self.security(auth_method, &chap)?;
            if let Some(p) = next {
                if rsp.transit {
                    return Err(proto("target transited before authentication finished"));
                }
                return Ok(InitiatorStep::Send(p));
            }
        } else if auth_method.is_some() || !chap.is_empty() {
            return Err(proto("security keys outside the security stage"));
        }

        if rsp.transit {
            if rsp.nsg <= self.stage {
                return Err(proto("bad NSG"));
            }
            if self.auth != IAuth::Done {
                return Err(proto("target transited before authentication finished"));
            }
            if rsp.nsg == Stage::FullFeature {
                if rsp.tsih == 0 {
                    return Err(proto("final login response without TSIH"));
                }
                return Ok(InitiatorStep::Complete(Box::new(InitiatorSession {
                    tsih: rsp.tsih,
                    isid: self.cfg.isid,
                    cid: self.cfg.cid,
                    session_type: if self.cfg.target_name.is_some() {
                        SessionType::Normal
                    } else {
                        SessionType::Discovery
                    },
                    target_name: self.cfg.target_name.clone(),
                    target_alias: self.target_alias.clone(),
                    target_portal_group_tag: self.tpgt,
                    params: self.neg.finish(),
                    cmd_sn: self.cfg.cmd_sn,
                    exp_stat_sn: self.exp_stat_sn,
                    exp_cmd_sn: rsp.exp_cmd_sn,
                    max_cmd_sn: rsp.max_cmd_sn,
                })));
            }
            self.stage = rsp.nsg;
        }

        // Build the next request.
        let mut pairs = std::mem::take(&mut self.answers);
        if self.stage == Stage::Operational && !self.operational_sent {
            self.operational_sent = true;
            pairs.extend(self.neg.offers());
        }
        if self.stage == Stage::Security {
            // Authentication done but the target did not transit: ask again.
            return Ok(InitiatorStep::Send(
                self.request(Some(Stage::Operational), &pairs),
            ));
        }
        Ok(InitiatorStep::Send(
            self.request(Some(Stage::FullFeature), &pairs),
        ))
    }

    /// Security stage; returns a request to send while CHAP is in progress.
    fn security(
        &mut self,
        auth_method: Option<String>,
        chap: &[(String, String)],
    ) -> Result<Option<Pdu>, LoginError> {
        let get = |k: &str| keys::get(chap, k);
        let auth = |s: &str| LoginError::Auth(s.to_string());
        match self.auth {
            IAuth::Offered => match auth_method.as_deref() {
                Some("None") | None if self.cfg.chap_mutual.is_some() => Err(auth(
                    "target did not authenticate itself (mutual CHAP required)",
                )),
                Some("None") | None => {
                    self.auth = IAuth::Done;
                    Ok(None)
                }
                Some("CHAP") => {
                    if self.cfg.chap.is_none() {
                        return Err(auth("target chose CHAP but we have no credentials"));
                    }
                    self.auth = IAuth::SentAlgorithm;
                    let p = vec![("CHAP_A".to_string(), CHAP_MD5.to_string())];
                    Ok(Some(self.request(None, &p)))
                }
                Some("Reject") => Err(auth("target rejected every AuthMethod we offered")),
                Some(other) => Err(LoginError::Protocol(format!(
                    "target chose AuthMethod={other} we did not offer"
                ))),
            },
            IAuth::SentAlgorithm => {
                let a = get("CHAP_A").ok_or_else(|| auth("no CHAP_A"))?;
                if parse_number(a) != Some(u64::from(CHAP_MD5)) {
                    return Err(auth("target chose a CHAP algorithm we did not offer"));
                }
                let id = get("CHAP_I")
                    .and_then(parse_number)
                    .filter(|v| *v <= 255)
                    .ok_or_else(|| auth("bad CHAP_I"))? as u8;
                let c = get("CHAP_C")
                    .and_then(decode_binary)
                    .filter(|c| !c.is_empty() && c.len() <= MAX_CHALLENGE_LEN)
                    .ok_or_else(|| auth("bad CHAP_C"))?;
                let cred = self
                    .cfg
                    .chap
                    .clone()
                    .ok_or_else(|| auth("no credentials"))?;
                let r = chap::response(id, &cred.secret, &c);
                let mut p = vec![
                    ("CHAP_N".to_string(), cred.name.clone()),
                    ("CHAP_R".to_string(), encode_hex(&r)),
                ];
                if self.cfg.chap_mutual.is_some() {
                    let (mid, mc) = chap::new_challenge();
                    if mc[..] == c[..] {
                        return Err(auth("challenge collision"));
                    }
                    p.push(("CHAP_I".to_string(), mid.to_string()));
                    p.push(("CHAP_C".to_string(), encode_hex(&mc)));
                    self.mutual_challenge = Some((mid, mc.to_vec()));
                }
                self.auth = IAuth::SentResponse;
                Ok(Some(self.request(Some(Stage::Operational), &p)))
            }
            IAuth::SentResponse => {
                if let Some((mid, mc)) = &self.mutual_challenge {
                    let m = self
                        .cfg
                        .chap_mutual
                        .as_ref()
                        .ok_or_else(|| auth("no mutual credentials"))?;
                    let n = get("CHAP_N").ok_or_else(|| auth("target sent no CHAP_N"))?;
                    if n != m.name {
                        return Err(auth("target CHAP_N does not match"));
                    }
                    let r = get("CHAP_R")
                        .and_then(decode_binary)
                        .ok_or_else(|| auth("target sent no CHAP_R"))?;
                    let expected = chap::response(*mid, &m.secret, mc);
                    if !chap::verify(&expected, &r) {
                        return Err(auth("target failed mutual CHAP"));
                    }
                }
                self.auth = IAuth::Done;
                Ok(None)
            }
            IAuth::Done => {
                if auth_method.is_some() || !chap.is_empty() {
                    return Err(LoginError::Protocol("unexpected security keys".into()));
                }
                Ok(None)
            }
        }
    }
}
