//! Target side of the login phase: [`TargetLogin`] answers Login Requests.

use bytes::{Bytes, BytesMut};

use super::{LoginStatus, SessionType, ISCSI_VERSION, LOGIN_MAX_DATA, MAX_LOGIN_PDUS};
use crate::chap::{self, ChapCredential, CHAP_MD5};
use crate::keys::{self, decode_binary, encode_hex, parse_number};
use crate::params::{Negotiation, NegotiationError, OperationalPrefs, Role, SessionParams};
use crate::pdu::{LoginRequest, LoginResponse, Opcode, Pdu, Stage};

/// Answer keys and the stage to transit to.
type Answers = (Vec<(String, String)>, Option<Stage>);

/// The outcome of a successful login, as seen by the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiatedSession {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// 48-bit ISID.
    pub isid: u64,
    /// The TSIH assigned to the session.
    pub tsih: u16,
    pub cid: u16,
    pub session_type: SessionType,
    /// Target name (normal sessions).
    pub target_name: Option<String>,
    /// CHAP name the initiator authenticated with, if any.
    pub chap_name: Option<String>,
    pub params: SessionParams,
    /// The next CmdSN expected (the login CmdSN: login PDUs are immediate).
    pub exp_cmd_sn: u32,
    /// The MaxCmdSN sent in the final response.
    pub max_cmd_sn: u32,
    /// StatSN for the next response on this connection.
    pub next_stat_sn: u32,
}

/// Target-side login configuration.
#[derive(Debug, Clone)]
pub struct TargetLoginConfig {
    pub portal_group_tag: u16,
    /// Target names served on this portal.
    pub targets: Vec<String>,
    /// Optional alias declared to initiators.
    pub target_alias: Option<String>,
    /// TSIH to assign to the new session (non-zero).
    pub tsih: u16,
    pub prefs: OperationalPrefs,
    /// CHAP credentials initiators may authenticate with. Non-empty means
    /// CHAP is required for normal sessions.
    pub chap_users: Vec<ChapCredential>,
    /// Our credentials for mutual CHAP (when the initiator challenges us).
    pub chap_mutual: Option<ChapCredential>,
    /// Require CHAP for discovery sessions too (when `chap_users` is set).
    pub chap_for_discovery: bool,
    /// Initiator names allowed to log in to normal sessions (empty: all).
    pub allowed_initiators: Vec<String>,
    /// Accept discovery sessions.
    pub allow_discovery: bool,
    /// StatSN of the first Login Response.
    pub initial_stat_sn: u32,
    /// Command window: MaxCmdSN = ExpCmdSN + window - 1 (at least 1).
    pub cmd_window: u32,
}

impl Default for TargetLoginConfig {
    fn default() -> Self {
        TargetLoginConfig {
            portal_group_tag: 1,
            targets: Vec::new(),
            target_alias: None,
            tsih: 1,
            prefs: OperationalPrefs::default(),
            chap_users: Vec::new(),
            chap_mutual: None,
            chap_for_discovery: false,
            allowed_initiators: Vec::new(),
            allow_discovery: true,
            initial_stat_sn: 1,
            cmd_window: 128,
        }
    }
}

/// What the target does with one Login Request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginStep {
    /// Send this response and wait for the next request.
    Respond(Pdu),
    /// Send this final response; the connection is in full feature phase.
    Complete {
        response: Pdu,
        session: Box<NegotiatedSession>,
    },
    /// Send this response (non-zero status) and close the connection.
    Failed { response: Pdu, status: LoginStatus },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthState {
    /// No AuthMethod chosen yet.
    Start,
    /// AuthMethod=CHAP chosen, waiting for CHAP_A.
    ChapWaitAlgorithm,
    /// Challenge sent, waiting for CHAP_N / CHAP_R.
    ChapWaitResponse { id: u8 },
    /// Authentication done (or not required).
    Done,
}

/// The target side of one connection's login.
#[derive(Debug)]
pub struct TargetLogin {
    cfg: TargetLoginConfig,
    first: bool,
    failed: Option<LoginStatus>,
    isid: u64,
    cid: u16,
    cmd_sn: u32,
    stat_sn: u32,
    stage: Stage,
    auth: AuthState,
    challenge: Vec<u8>,
    chap_name: Option<String>,
    initiator_name: Option<String>,
    initiator_alias: Option<String>,
    target_name: Option<String>,
    session_type: SessionType,
    neg: Negotiation,
    /// Request text being assembled (C bit).
    partial: BytesMut,
    /// Response text chunks still to send, with the transition they lead to.
    outgoing: Vec<Bytes>,
    outgoing_transit: Option<Stage>,
    tpgt_sent: bool,
    declared: bool,
    pdus: u32,
}

impl TargetLogin {
    pub fn new(cfg: TargetLoginConfig) -> TargetLogin {
        let neg = Negotiation::new(Role::Target, cfg.prefs.clone(), false);
        TargetLogin {
            stat_sn: cfg.initial_stat_sn,
            cfg,
            first: true,
            failed: None,
            isid: 0,
            cid: 0,
            cmd_sn: 0,
            stage: Stage::Security,
            auth: AuthState::Start,
            challenge: Vec::new(),
            chap_name: None,
            initiator_name: None,
            initiator_alias: None,
            target_name: None,
            session_type: SessionType::Normal,
            neg,
            partial: BytesMut::new(),
            outgoing: Vec::new(),
            outgoing_transit: None,
            tpgt_sent: false,
            declared: false,
            pdus: 0,
        }
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    fn chap_required(&self) -> bool {
        !self.cfg.chap_users.is_empty()
            && (self.session_type == SessionType::Normal || self.cfg.chap_for_discovery)
    }

    fn max_cmd_sn(&self) -> u32 {
        self.cmd_sn
            .wrapping_add(self.cfg.cmd_window.max(1))
            .wrapping_sub(1)
    }

    fn response(
        &mut self,
        itt: u32,
        transit: Option<Stage>,
        cont: bool,
        status: LoginStatus,
        data: Bytes,
        tsih: u16,
    ) -> Pdu {
        let r = LoginResponse {
            transit: transit.is_some(),
            cont,
            csg: self.stage,
            nsg: transit.unwrap_or(self.stage),
            version_max: ISCSI_VERSION,
            version_active: ISCSI_VERSION,
            isid: self.isid,
            tsih,
            itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            status_class: status.class,
            status_detail: status.detail,
            data,
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        r.to_pdu()
    }

    fn fail(&mut self, itt: u32, status: LoginStatus) -> LoginStep {
        self.failed = Some(status);
        let response = self.response(itt, None, false, status, Bytes::new(), 0);
        LoginStep::Failed { response, status }
    }

    /// Handles one PDU received during login.
    pub fn step(&mut self, pdu: &Pdu) -> LoginStep {
        let itt = pdu.itt();
        if let Some(status) = self.failed {
            return self.fail(itt, status);
        }
        self.pdus += 1;
        if self.pdus > MAX_LOGIN_PDUS {
            return self.fail(itt, LoginStatus::INITIATOR_ERROR);
        }
        if pdu.opcode_raw() != Opcode::LoginRequest as u8 {
            return self.fail(itt, LoginStatus::INVALID_DURING_LOGIN);
        }
        let req = match LoginRequest::parse(pdu) {
            Ok(r) => r,
            Err(_) => return self.fail(itt, LoginStatus::INITIATOR_ERROR),
        };
        if self.first {
            self.first = false;
            self.isid = req.isid;
            self.cid = req.cid;
            self.cmd_sn = req.cmd_sn;
            self.stage = req.csg;
            if req.version_min > ISCSI_VERSION {
                return self.fail(itt, LoginStatus::UNSUPPORTED_VERSION);
            }
            if req.tsih != 0 {
                // Adding a connection to an existing session or session
                // reinstatement by TSIH: we keep one connection per session.
                return self.fail(itt, LoginStatus::SESSION_DOES_NOT_EXIST);
            }
            if req.csg == Stage::FullFeature {
                return self.fail(itt, LoginStatus::INITIATOR_ERROR);
            }
        } else {
            if req.isid != self.isid || req.tsih != 0 || req.cid != self.cid {
                return self.fail(itt, LoginStatus::INITIATOR_ERROR);
            }
            if req.csg != self.stage {
                return self.fail(itt, LoginStatus::INITIATOR_ERROR);
            }
            self.cmd_sn = req.cmd_sn;
        }

        // Continuing a response we split over several PDUs.
        if !self.outgoing.is_empty() {
            if !req.data.is_empty() || req.cont {
                return self.fail(itt, LoginStatus::INITIATOR_ERROR);
            }
            return self.send_next_chunk(itt);
        }

        // Assemble a request split with the C bit.
        if req.cont || !self.partial.is_empty() {
            if self.partial.len() + req.data.len() > keys::MAX_TEXT_LEN {
                return self.fail(itt, LoginStatus::INITIATOR_ERROR);
            }
            self.partial.extend_from_slice(&req.data);
            if req.cont {
                let r = self.response(itt, None, false, LoginStatus::SUCCESS, Bytes::new(), 0);
                return LoginStep::Respond(r);
            }
        }
        let text = if self.partial.is_empty() {
            req.data.clone()
        } else {
            std::mem::take(&mut self.partial).freeze()
        };
        let pairs = match keys::parse(&text) {
            Ok(p) => p,
            Err(_) => return self.fail(itt, LoginStatus::INITIATOR_ERROR),
        };
        match self.process(&req, pairs) {
            Ok((answers, transit)) => self.respond(itt, answers, transit),
            Err(status) => self.fail(itt, status),
        }
    }

    /// Interprets the keys of one complete request; returns our answer
    /// keys and the stage to transit to, if any.
    fn process(
        &mut self,
        req: &LoginRequest,
        pairs: Vec<(String, String)>,
    ) -> Result<Answers, LoginStatus> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut rest: Vec<(String, String)> = Vec::new();
        let mut auth_method: Option<String> = None;
        let mut chap: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "InitiatorName" => {
                    if self.initiator_name.as_deref().is_some_and(|n| n != v) {
                        return Err(LoginStatus::INITIATOR_ERROR);
                    }
                    self.initiator_name = Some(v);
                }
                "InitiatorAlias" => self.initiator_alias = Some(v),
                "TargetName" => {
                    if self.target_name.as_deref().is_some_and(|n| n != v) {
                        return Err(LoginStatus::INITIATOR_ERROR);
                    }
                    self.target_name = Some(v);
                }
                "SessionType" => {
                    if !self.initiator_name_first_pdu_allowed() {
                        return Err(LoginStatus::INITIATOR_ERROR);
                    }
                    self.session_type = match v.as_str() {
                        "Normal" => SessionType::Normal,
                        "Discovery" => SessionType::Discovery,
                        _ => return Err(LoginStatus::SESSION_TYPE_NOT_SUPPORTED),
                    };
                }
                "AuthMethod" => auth_method = Some(v),
                "CHAP_A" | "CHAP_I" | "CHAP_C" | "CHAP_N" | "CHAP_R" => chap.push((k, v)),
                _ => rest.push((k, v)),
            }
        }

        // Checks on the leading PDU.
        if !self.tpgt_sent {
            let name = self
                .initiator_name
                .clone()
                .ok_or(LoginStatus::MISSING_PARAMETER)?;
            if name.is_empty() {
                return Err(LoginStatus::MISSING_PARAMETER);
            }
            match self.session_type {
                SessionType::Discovery => {
                    if !self.cfg.allow_discovery {
                        return Err(LoginStatus::SESSION_TYPE_NOT_SUPPORTED);
                    }
                    self.neg.set_discovery(true);
                }
                SessionType::Normal => {
                    let t = self
                        .target_name
                        .as_deref()
                        .ok_or(LoginStatus::MISSING_PARAMETER)?;
                    if !self.cfg.targets.iter().any(|n| n.eq_ignore_ascii_case(t)) {
                        return Err(LoginStatus::NOT_FOUND);
                    }
                    if !self.cfg.allowed_initiators.is_empty()
                        && !self
                            .cfg
                            .allowed_initiators
                            .iter()
                            .any(|n| n.eq_ignore_ascii_case(&name))
                    {
                        return Err(LoginStatus::AUTHORIZATION_FAILURE);
                    }
                }
            }
            self.tpgt_sent = true;
            out.push((
                "TargetPortalGroupTag".to_string(),
                self.cfg.portal_group_tag.to_string(),
            ));
        }

        match self.stage {
            Stage::Security => {
                self.security(auth_method, chap, &mut out)?;
            }
            Stage::Operational => {
                if auth_method.is_some() || !chap.is_empty() {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                if self.auth != AuthState::Done {
                    if self.chap_required() {
                        return Err(LoginStatus::AUTHENTICATION_FAILURE);
                    }
                    self.auth = AuthState::Done;
                }
            }
            Stage::FullFeature => return Err(LoginStatus::INITIATOR_ERROR),
        }

        // Operational keys (accepted in the security stage too).
        let answers = self
            .neg
            .process(&rest)
            .map_err(|_: NegotiationError| LoginStatus::INITIATOR_ERROR)?;
        out.extend(answers);
        if self.stage == Stage::Operational && !self.declared {
            self.declared = true;
            out.extend(self.neg.offers());
            if let Some(a) = &self.cfg.target_alias {
                out.push(("TargetAlias".to_string(), a.clone()));
            }
        }

        // Stage transition.
        let transit = if req.transit {
            if req.nsg <= self.stage {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
            if self.auth == AuthState::Done {
                Some(req.nsg)
            } else {
                None
            }
        } else {
            None
        };
        Ok((out, transit))
    }

    fn initiator_name_first_pdu_allowed(&self) -> bool {
        // SessionType may only be sent on the leading request.
        !self.tpgt_sent
    }

    fn security(
        &mut self,
        auth_method: Option<String>,
        chap: Vec<(String, String)>,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), LoginStatus> {
        let get = |k: &str| keys::get(&chap, k).map(str::to_owned);
        match self.auth {
            AuthState::Start => {
                if !chap.is_empty() {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                let required = self.chap_required();
                let offered: Vec<String> = match &auth_method {
                    Some(m) => m.split(',').map(str::to_owned).collect(),
                    None => {
                        if required {
                            return Err(LoginStatus::AUTHENTICATION_FAILURE);
                        }
                        // No AuthMethod: nothing to negotiate in security.
                        self.auth = AuthState::Done;
                        return Ok(());
                    }
                };
                let has = |m: &str| offered.iter().any(|o| o == m);
                if required {
                    if !has("CHAP") {
                        return Err(LoginStatus::AUTHENTICATION_FAILURE);
                    }
                    out.push(("AuthMethod".to_string(), "CHAP".to_string()));
                    self.auth = AuthState::ChapWaitAlgorithm;
                } else if has("None") {
                    out.push(("AuthMethod".to_string(), "None".to_string()));
                    self.auth = AuthState::Done;
                } else if has("CHAP") && !self.cfg.chap_users.is_empty() {
                    out.push(("AuthMethod".to_string(), "CHAP".to_string()));
                    self.auth = AuthState::ChapWaitAlgorithm;
                } else {
                    // We can't authenticate anyone and None was not offered.
                    return Err(LoginStatus::AUTHENTICATION_FAILURE);
                }
            }
            AuthState::ChapWaitAlgorithm => {
                if auth_method.is_some() {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                let a = get("CHAP_A").ok_or(LoginStatus::AUTHENTICATION_FAILURE)?;
                if chap.len() != 1 {
                    return Err(LoginStatus::AUTHENTICATION_FAILURE);
                }
                if !a
                    .split(',')
                    .any(|x| parse_number(x) == Some(u64::from(CHAP_MD5)))
                {
                    // RFC 7143 §12.1.3: no common algorithm -> authentication failure.
                    return Err(LoginStatus::AUTHENTICATION_FAILURE);
                }
                let (id, c) = chap::new_challenge();
                self.challenge = c.to_vec();
                out.push(("CHAP_A".to_string(), CHAP_MD5.to_string()));
                out.push(("CHAP_I".to_string(), id.to_string()));
                out.push(("CHAP_C".to_string(), encode_hex(&c)));
                self.auth = AuthState::ChapWaitResponse { id };
            }
            AuthState::ChapWaitResponse { id } => {
                if auth_method.is_some() {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                let name = get("CHAP_N").ok_or(LoginStatus::AUTHENTICATION_FAILURE)?;
                let r = get("CHAP_R")
                    .and_then(|r| decode_binary(&r))
                    .ok_or(LoginStatus::AUTHENTICATION_FAILURE)?;
                let user = self
                    .cfg
                    .chap_users
                    .iter()
                    .find(|u| u.name == name)
                    .ok_or(LoginStatus::AUTHENTICATION_FAILURE)?;
                let expected = chap::response(id, &user.secret, &self.challenge);
                if !chap::verify(&expected, &r) {
                    return Err(LoginStatus::AUTHENTICATION_FAILURE);
                }
                self.chap_name = Some(name);
                // Mutual CHAP: the initiator challenges us.
                match (get("CHAP_I"), get("CHAP_C")) {
                    (None, None) => {}
                    (Some(i), Some(c)) => {
                        let mutual = self
                            .cfg
                            .chap_mutual
                            .clone()
                            .ok_or(LoginStatus::AUTHENTICATION_FAILURE)?;
                        let i = parse_number(&i)
                            .filter(|v| *v <= 255)
                            .ok_or(LoginStatus::AUTHENTICATION_FAILURE)?
                            as u8;
                        // Too short a challenge (under the 16-byte hash
                        // output) or too long: authentication failure.
                        let c = decode_binary(&c)
                            .filter(|c| chap::challenge_acceptable(c))
                            .ok_or(LoginStatus::AUTHENTICATION_FAILURE)?;
                        // A reflected challenge is an attack (RFC 7143 §12.1.3).
                        if c == self.challenge {
                            return Err(LoginStatus::AUTHENTICATION_FAILURE);
                        }
                        let resp = chap::response(i, &mutual.secret, &c);
                        out.push(("CHAP_N".to_string(), mutual.name.clone()));
                        out.push(("CHAP_R".to_string(), encode_hex(&resp)));
                    }
                    _ => return Err(LoginStatus::AUTHENTICATION_FAILURE),
                }
                self.auth = AuthState::Done;
            }
            AuthState::Done => {
                if auth_method.is_some() || !chap.is_empty() {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
            }
        }
        Ok(())
    }

    fn respond(
        &mut self,
        itt: u32,
        answers: Vec<(String, String)>,
        transit: Option<Stage>,
    ) -> LoginStep {
        let text = keys::build(&answers);
        if text.len() > LOGIN_MAX_DATA {
            let mut chunks = keys::chunks(&text, LOGIN_MAX_DATA);
            chunks.reverse();
            self.outgoing = chunks;
            self.outgoing_transit = transit;
            return self.send_next_chunk(itt);
        }
        self.finish_response(itt, text, transit)
    }

    fn send_next_chunk(&mut self, itt: u32) -> LoginStep {
        let chunk = self.outgoing.pop().unwrap_or_default();
        if self.outgoing.is_empty() {
            let transit = self.outgoing_transit.take();
            self.finish_response(itt, chunk, transit)
        } else {
            let r = self.response(itt, None, true, LoginStatus::SUCCESS, chunk, 0);
            LoginStep::Respond(r)
        }
    }

    fn finish_response(&mut self, itt: u32, text: Bytes, transit: Option<Stage>) -> LoginStep {
        match transit {
            Some(Stage::FullFeature) => {
                let tsih = self.cfg.tsih;
                let response = self.response(itt, transit, false, LoginStatus::SUCCESS, text, tsih);
                let session = NegotiatedSession {
                    initiator_name: self.initiator_name.clone().unwrap_or_default(),
                    initiator_alias: self.initiator_alias.clone(),
                    isid: self.isid,
                    tsih,
                    cid: self.cid,
                    session_type: self.session_type,
                    target_name: match self.session_type {
                        SessionType::Normal => self.target_name.clone(),
                        SessionType::Discovery => None,
                    },
                    chap_name: self.chap_name.clone(),
                    params: self.neg.finish(),
                    exp_cmd_sn: self.cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                    next_stat_sn: self.stat_sn,
                };
                self.stage = Stage::FullFeature;
                LoginStep::Complete {
                    response,
                    session: Box::new(session),
                }
            }
            Some(next) => {
                let r = self.response(itt, transit, false, LoginStatus::SUCCESS, text, 0);
                self.stage = next;
                LoginStep::Respond(r)
            }
            None => {
                let r = self.response(itt, None, false, LoginStatus::SUCCESS, text, 0);
                LoginStep::Respond(r)
            }
        }
    }
}

/// Builds a redirection Login Response (Status-Class 1) sending the
/// initiator to `target_address` (`host:port,tpgt`, IPv6 in brackets).
pub fn redirect_login(req: &Pdu, permanent: bool, target_address: &str, stat_sn: u32) -> Pdu {
    let status = if permanent {
        LoginStatus::TARGET_MOVED_PERMANENTLY
    } else {
        LoginStatus::TARGET_MOVED_TEMPORARILY
    };
    let p = reject_login(req, status, stat_sn);
    let mut b = keys::TextBuilder::new();
    b.push("TargetAddress", target_address);
    Pdu::new(p.bhs, Bytes::new(), b.finish())
}

/// Builds a Login Response that rejects `req` with `status`, for use when
/// no [`TargetLogin`] exists (e.g. the portal is shutting down).
pub fn reject_login(req: &Pdu, status: LoginStatus, stat_sn: u32) -> Pdu {
    let mut v = [0u8; 8];
    v[2..8].copy_from_slice(&req.bhs[8..14]);
    let isid = u64::from_be_bytes(v);
    LoginResponse {
        transit: false,
        cont: false,
        csg: Stage::Security,
        nsg: Stage::Security,
        version_max: ISCSI_VERSION,
        version_active: ISCSI_VERSION,
        isid,
        tsih: 0,
        itt: req.itt(),
        stat_sn,
        exp_cmd_sn: req.cmd_sn(),
        max_cmd_sn: req.cmd_sn(),
        status_class: status.class,
        status_detail: status.detail,
        data: Bytes::new(),
    }
    .to_pdu()
}
