//! Target and initiator login state machines talking to each other in
//! memory, through the real codec.

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::codec::PduCodec;
use keyfence_iscsi::keys;
use keyfence_iscsi::login::*;
use keyfence_iscsi::params::{Digest, OperationalPrefs};
use keyfence_iscsi::pdu::{LoginRequest, LoginResponse, Pdu, Stage};
use keyfence_iscsi::ChapCredential;

const TARGET: &str = "iqn.2026-11.org.keyfence:disk1";
const INITIATOR: &str = "iqn.1993-08.org.debian:01:host1";
const ISID: u64 = 0x0002_3d00_0001;

fn wire(p: &Pdu) -> Pdu {
    let mut c = PduCodec::new();
    let mut b = BytesMut::new();
    c.encode(p, &mut b).unwrap();
    let out = c.decode(&mut b).unwrap().unwrap();
    assert!(b.is_empty());
    out
}

fn target_cfg() -> TargetLoginConfig {
    TargetLoginConfig {
        portal_group_tag: 7,
        targets: vec![TARGET.to_string(), "iqn.2026-11.org.keyfence:disk2".into()],
        target_alias: Some("disk1".into()),
        tsih: 0x42,
        ..TargetLoginConfig::default()
    }
}

#[derive(Debug)]
enum Outcome {
    Ok(Box<NegotiatedSession>, Box<InitiatorSession>, usize),
    TargetFailed(LoginStatus, LoginError),
    InitiatorFailed(LoginError),
}

/// Runs both state machines to the end; returns the outcome and the
/// number of round trips.
fn run(tcfg: TargetLoginConfig, icfg: InitiatorLoginConfig) -> Outcome {
    let mut t = TargetLogin::new(tcfg);
    let mut i = InitiatorLogin::new(icfg);
    let mut req = i.start();
    for round in 1..=40 {
        match t.step(&wire(&req)) {
            LoginStep::Respond(rsp) => match i.step(&wire(&rsp)) {
                Ok(InitiatorStep::Send(next)) => req = next,
                Ok(InitiatorStep::Complete(_)) => {
                    panic!("initiator completed on a non-final response")
                }
                Err(e) => return Outcome::InitiatorFailed(e),
            },
            LoginStep::Complete { response, session } => {
                return match i.step(&wire(&response)) {
                    Ok(InitiatorStep::Complete(is)) => Outcome::Ok(session, is, round),
                    other => panic!("initiator did not complete: {other:?}"),
                }
            }
            LoginStep::Failed { response, status } => {
                let e = i.step(&wire(&response)).unwrap_err();
                return Outcome::TargetFailed(status, e);
            }
        }
    }
    panic!("login did not converge");
}

fn expect_ok(o: Outcome) -> (Box<NegotiatedSession>, Box<InitiatorSession>, usize) {
    match o {
        Outcome::Ok(a, b, n) => (a, b, n),
        other => panic!("login failed: {other:?}"),
    }
}

fn expect_target_fail(o: Outcome, want: LoginStatus) {
    match o {
        Outcome::TargetFailed(status, LoginError::Status { status: seen, .. }) => {
            assert_eq!(status, want);
            assert_eq!(seen, want);
        }
        other => panic!("expected target failure {want}, got {other:?}"),
    }
}

#[test]
fn normal_login_without_auth() {
    let mut icfg = InitiatorLoginConfig::new(INITIATOR, ISID, Some(TARGET.into()));
    icfg.initiator_alias = Some("host1".into());
    icfg.cmd_sn = 1000;
    icfg.prefs.header_digest = vec![Digest::Crc32c, Digest::None];
    icfg.prefs.max_recv_data_segment_length = 65536;
    let (ts, is, rounds) = expect_ok(run(target_cfg(), icfg));
    assert_eq!(rounds, 2); // security -> operational -> full feature
    assert_eq!(ts.initiator_name, INITIATOR);
    assert_eq!(ts.initiator_alias.as_deref(), Some("host1"));
    assert_eq!(ts.isid, ISID);
    assert_eq!(ts.tsih, 0x42);
    assert_eq!(is.tsih, 0x42);
    assert_eq!(ts.session_type, SessionType::Normal);
    assert_eq!(ts.target_name.as_deref(), Some(TARGET));
    assert_eq!(ts.chap_name, None);
    assert_eq!(is.target_portal_group_tag, Some(7));
    assert_eq!(is.target_alias.as_deref(), Some("disk1"));
    // both sides agree
    assert!(ts.params.header_digest && is.params.header_digest);
    assert!(!ts.params.data_digest && !is.params.data_digest);
    assert_eq!(ts.params.max_send_data_segment_length, 65536);
    assert_eq!(is.params.max_recv_data_segment_length, 65536);
    assert_eq!(is.params.max_send_data_segment_length, 262_144);
    assert_eq!(ts.params.max_recv_data_segment_length, 262_144);
    assert_eq!(ts.params.max_burst_length, is.params.max_burst_length);
    assert_eq!(ts.params.immediate_data, is.params.immediate_data);
    assert_eq!(ts.params.initial_r2t, is.params.initial_r2t);
    assert_eq!(ts.params.error_recovery_level, 0);
    // sequencing: login is immediate, CmdSN does not advance
    assert_eq!(ts.exp_cmd_sn, 1000);
    assert_eq!(is.cmd_sn, 1000);
    assert_eq!(is.exp_cmd_sn, 1000);
    assert_eq!(is.max_cmd_sn, 1000 + 127);
    assert_eq!(is.exp_stat_sn, ts.next_stat_sn);
}

#[test]
fn discovery_login() {
    let icfg = InitiatorLoginConfig::new(INITIATOR, ISID, None);
    let (ts, is, _) = expect_ok(run(target_cfg(), icfg));
    assert_eq!(ts.session_type, SessionType::Discovery);
    assert_eq!(is.session_type, SessionType::Discovery);
    assert_eq!(ts.target_name, None);

    let mut tcfg = target_cfg();
    tcfg.allow_discovery = false;
    let icfg = InitiatorLoginConfig::new(INITIATOR, ISID, None);
    expect_target_fail(run(tcfg, icfg), LoginStatus::SESSION_TYPE_NOT_SUPPORTED);
}

#[test]
fn chap_success_one_way_and_mutual() {
    let mut tcfg = target_cfg();
    tcfg.chap_users = vec![
        ChapCredential::new("other", "nope-nope-nope"),
        ChapCredential::new("host1", "s3cret-s3cret"),
    ];
    let mut icfg = InitiatorLoginConfig::new(INITIATOR, ISID, Some(TARGET.into()));
    icfg.chap = Some(ChapCredential::new("host1", "s3cret-s3cret"));
    let (ts, _, rounds) = expect_ok(run(tcfg.clone(), icfg.clone()));
    assert_eq!(ts.chap_name.as_deref(), Some("host1"));
    assert_eq!(rounds, 4); // AuthMethod, CHAP_A, CHAP_R, operational

    tcfg.chap_mutual = Some(ChapCredential::new("disk1", "target-secret!"));
    icfg.chap_mutual = Some(ChapCredential::new("disk1", "target-secret!"));
    let (ts, _, _) = expect_ok(run(tcfg, icfg));
    assert_eq!(ts.chap_name.as_deref(), Some("host1"));
}

#[test]
fn chap_failures() {
    let mut tcfg = target_cfg();
    tcfg.chap_users = vec![ChapCredential::new("host1", "s3cret-s3cret")];

    // wrong secret
    let mut icfg = InitiatorLoginConfig::new(INITIATOR, ISID, Some(TARGET.into()));
    icfg.chap = Some(ChapCredential::new("host1", "wrong-secret!"));
    expect_target_fail(run(tcfg.clone(), icfg), LoginStatus::AUTHENTICATION_FAILURE);

    // unknown user
    let mut icfg = InitiatorLoginConfig::new(INITIATOR, ISID, Some(TARGET.into()));
    icfg.chap = Some(ChapCredential::new("host2", "s3cret-s3cret"));
    expect_target_fail(run(tcfg.clone(), icfg), LoginStatus::AUTHENTICATION_FAILURE);

    // initiator offers only None while the target requires CHAP
    let icfg = InitiatorLoginConfig::new(INITIATOR, ISID, Some(TARGET.into()));
    expect_target_fail(run(tcfg.clone(), icfg), LoginStatus::AUTHENTICATION_FAILURE);

    // mutual CHAP requested but the target has no mutual secret
    let mut icfg = InitiatorLoginConfig::new(INITIATOR, ISID, Some(TARGET.into()));
    icfg.chap = Some(ChapCredential::new("host1", "s3cret-s3cret"));
    icfg.chap_mutual = Some(ChapCredential::new("disk1", "target-secret!"));
    expect_target_fail(
        run(tcfg.clone(), icfg.clone()),
        LoginStatus::AUTHENTICATION_FAILURE,
    );

    // mutual CHAP where the target proves a different secret: the initiator refuses
    let mut tcfg2 = tcfg.clone();
    tcfg2.chap_mutual = Some(ChapCredential::new("disk1", "not-the-secret"));
    match run(tcfg2, icfg) {
        Outcome::InitiatorFailed(LoginError::Auth(_)) => {}
        other => panic!("expected initiator auth failure, got {other:?}"),
    }

    // mutual CHAP configured on the initiator, target without CHAP: the
    // initiator offers only CHAP, so the target cannot downgrade to None
    let mut icfg = InitiatorLoginConfig::new(INITIATOR, ISID, Some(TARGET.into()));
    icfg.chap = Some(ChapCredential::new("host1", "s3cret-s3cret"));
    icfg.chap_mutual = Some(ChapCredential::new("disk1", "target-secret!"));
    expect_target_fail(
        run(target_cfg(), icfg.clone()),
        LoginStatus::AUTHENTICATION_FAILURE,
    );
    let mut i = InitiatorLogin::new(icfg);
    let first = LoginRequest::parse(&i.start()).unwrap();
    assert_eq!(
        keys::get(&keys::parse(&first.data).unwrap(), "AuthMethod"),
        Some("CHAP")
    );
    let mut b = keys::TextBuilder::new();
    b.push("AuthMethod", "None");
    let rogue = LoginResponse {
        transit: true,
        cont: false,
        csg: Stage::Security,
        nsg: Stage::Operational,
        version_max: 0,
        version_active: 0,
        isid: ISID,
        tsih: 0,
        itt: 0,
        stat_sn: 1,
        exp_cmd_sn: 1,
        max_cmd_sn: 1,
        status_class: 0,
        status_detail: 0,
        data: b.finish(),
    };
    assert!(matches!(i.step(&rogue.to_pdu()), Err(LoginError::Auth(_))));

    // discovery is open unless chap_for_discovery
    let icfg = InitiatorLoginConfig::new(INITIATOR, ISID, None);
    expect_ok(run(tcfg.clone(), icfg.clone()));
    tcfg.chap_for_discovery = true;
    expect_target_fail(run(tcfg, icfg), LoginStatus::AUTHENTICATION_FAILURE);
}

#[test]
fn target_side_rejections() {
    let icfg = InitiatorLoginConfig::new(
        INITIATOR,
        ISID,
        Some("iqn.2026-11.org.keyfence:nope".into()),
    );
    expect_target_fail(run(target_cfg(), icfg), LoginStatus::NOT_FOUND);

    let mut tcfg = target_cfg();
    tcfg.allowed_initiators = vec!["iqn.1993-08.org.debian:01:other".into()];
    let icfg = InitiatorLoginConfig::new(INITIATOR, ISID, Some(TARGET.into()));
    expect_target_fail(run(tcfg, icfg), LoginStatus::AUTHORIZATION_FAILURE);
}

fn raw_request(csg: Stage, transit: Option<Stage>, text: &[(&str, &str)]) -> LoginRequest {
    let mut b = keys::TextBuilder::new();
    for (k, v) in text {
        b.push(k, v);
    }
    LoginRequest {
        transit: transit.is_some(),
        cont: false,
        csg,
        nsg: transit.unwrap_or(csg),
        version_max: 0,
        version_min: 0,
        isid: ISID,
        tsih: 0,
        itt: 9,
        cid: 0,
        cmd_sn: 5,
        exp_stat_sn: 0,
        data: b.finish(),
    }
}

fn status_of(step: LoginStep) -> LoginStatus {
    match step {
        LoginStep::Failed { response, status } => {
            let r = LoginResponse::parse(&response).unwrap();
            assert_eq!(
                (r.status_class, r.status_detail),
                (status.class, status.detail)
            );
            assert!(!r.transit);
            assert_eq!(r.itt, 9);
            status
        }
        other => panic!("expected failure, got {other:?}"),
    }
}

#[test]
fn malformed_logins() {
    // missing InitiatorName
    let mut t = TargetLogin::new(target_cfg());
    let r = raw_request(
        Stage::Security,
        Some(Stage::Operational),
        &[("TargetName", TARGET)],
    );
    assert_eq!(
        status_of(t.step(&r.to_pdu())),
        LoginStatus::MISSING_PARAMETER
    );
    // once failed, stays failed
    assert_eq!(
        status_of(t.step(&r.to_pdu())),
        LoginStatus::MISSING_PARAMETER
    );

    // missing TargetName for a normal session
    let mut t = TargetLogin::new(target_cfg());
    let r = raw_request(Stage::Security, None, &[("InitiatorName", INITIATOR)]);
    assert_eq!(
        status_of(t.step(&r.to_pdu())),
        LoginStatus::MISSING_PARAMETER
    );

    // unknown session type
    let mut t = TargetLogin::new(target_cfg());
    let r = raw_request(
        Stage::Security,
        None,
        &[("InitiatorName", INITIATOR), ("SessionType", "Weird")],
    );
    assert_eq!(
        status_of(t.step(&r.to_pdu())),
        LoginStatus::SESSION_TYPE_NOT_SUPPORTED
    );

    // unsupported version
    let mut t = TargetLogin::new(target_cfg());
    let mut r = raw_request(Stage::Security, None, &[("InitiatorName", INITIATOR)]);
    r.version_min = 1;
    r.version_max = 2;
    assert_eq!(
        status_of(t.step(&r.to_pdu())),
        LoginStatus::UNSUPPORTED_VERSION
    );

    // TSIH of a session we do not have
    let mut t = TargetLogin::new(target_cfg());
    let mut r = raw_request(Stage::Security, None, &[("InitiatorName", INITIATOR)]);
    r.tsih = 5;
    assert_eq!(
        status_of(t.step(&r.to_pdu())),
        LoginStatus::SESSION_DOES_NOT_EXIST
    );

    // not a login PDU at all
    let mut t = TargetLogin::new(target_cfg());
    let mut bhs = [0u8; 48];
    bhs[0] = 0x01;
    bhs[1] = 0x80;
    bhs[16..20].copy_from_slice(&9u32.to_be_bytes());
    assert_eq!(
        status_of(t.step(&Pdu::from_bhs(bhs))),
        LoginStatus::INVALID_DURING_LOGIN
    );

    // malformed text
    let mut t = TargetLogin::new(target_cfg());
    let mut r = raw_request(Stage::Security, None, &[]);
    r.data = Bytes::from_static(b"InitiatorName\0");
    assert_eq!(status_of(t.step(&r.to_pdu())), LoginStatus::INITIATOR_ERROR);

    // transit backwards
    let mut t = TargetLogin::new(target_cfg());
    let r = raw_request(
        Stage::Operational,
        Some(Stage::Security),
        &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
    );
    let mut p = r.to_pdu();
    p.bhs[1] = 0x80 | (1 << 2); // CSG=1, NSG=0
    assert_eq!(status_of(t.step(&p)), LoginStatus::INITIATOR_ERROR);

    // renegotiating a key
    let mut t = TargetLogin::new(target_cfg());
    let r = raw_request(
        Stage::Operational,
        None,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("MaxBurstLength", "4096"),
        ],
    );
    assert!(matches!(t.step(&r.to_pdu()), LoginStep::Respond(_)));
    let r = raw_request(Stage::Operational, None, &[("MaxBurstLength", "8192")]);
    assert_eq!(status_of(t.step(&r.to_pdu())), LoginStatus::INITIATOR_ERROR);

    // operational stage first while CHAP is required
    let mut cfg = target_cfg();
    cfg.chap_users = vec![ChapCredential::new("u", "s3cret-s3cret")];
    let mut t = TargetLogin::new(cfg);
    let r = raw_request(
        Stage::Operational,
        Some(Stage::FullFeature),
        &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
    );
    assert_eq!(
        status_of(t.step(&r.to_pdu())),
        LoginStatus::AUTHENTICATION_FAILURE
    );

    // CHAP_A without MD5
    let mut cfg = target_cfg();
    cfg.chap_users = vec![ChapCredential::new("u", "s3cret-s3cret")];
    let mut t = TargetLogin::new(cfg);
    let r = raw_request(
        Stage::Security,
        None,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ],
    );
    assert!(matches!(t.step(&r.to_pdu()), LoginStep::Respond(_)));
    let r = raw_request(Stage::Security, None, &[("CHAP_A", "6,7")]);
    assert_eq!(
        status_of(t.step(&r.to_pdu())),
        LoginStatus::AUTHENTICATION_FAILURE
    );
}

/// Straight from security to full feature phase, and the request text
/// split with the C bit.
#[test]
fn direct_to_full_feature_and_continuation() {
    let mut t = TargetLogin::new(target_cfg());
    let text = {
        let mut b = keys::TextBuilder::new();
        b.push("InitiatorName", INITIATOR);
        b.push("SessionType", "Normal");
        b.push("TargetName", TARGET);
        b.push("AuthMethod", "None");
        b.finish()
    };
    let (a, b) = text.split_at(20);
    let mut r = raw_request(Stage::Security, None, &[]);
    r.cont = true;
    r.data = Bytes::copy_from_slice(a);
    let rsp = match t.step(&r.to_pdu()) {
        LoginStep::Respond(p) => LoginResponse::parse(&p).unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(rsp.data.is_empty() && !rsp.transit);
    let stat0 = rsp.stat_sn;
    let mut r = raw_request(Stage::Security, Some(Stage::FullFeature), &[]);
    r.data = Bytes::copy_from_slice(b);
    match t.step(&r.to_pdu()) {
        LoginStep::Complete { response, session } => {
            let rsp = LoginResponse::parse(&response).unwrap();
            assert!(rsp.transit);
            assert_eq!(rsp.nsg, Stage::FullFeature);
            assert_eq!(rsp.csg, Stage::Security);
            assert_eq!(rsp.tsih, 0x42);
            assert_eq!(rsp.stat_sn, stat0 + 1);
            let pairs = keys::parse(&rsp.data).unwrap();
            assert_eq!(keys::get(&pairs, "AuthMethod"), Some("None"));
            assert_eq!(keys::get(&pairs, "TargetPortalGroupTag"), Some("7"));
            // no operational stage: defaults in force
            assert_eq!(session.params, keyfence_iscsi::SessionParams::default());
            assert_eq!(session.next_stat_sn, stat0 + 2);
        }
        other => panic!("{other:?}"),
    }
}

/// A response longer than 8192 bytes is sent over several Login Responses
/// with the C bit; the initiator collects them with empty requests.
#[test]
fn long_response_is_split() {
    let mut t = TargetLogin::new(target_cfg());
    let names: Vec<(String, String)> = (0..200)
        .map(|n| {
            (
                format!("X-com.example.{n:03}-{}", "k".repeat(40)),
                "v".to_string(),
            )
        })
        .collect();
    let mut pairs: Vec<(&str, &str)> = vec![("InitiatorName", INITIATOR), ("TargetName", TARGET)];
    pairs.extend(names.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let r = raw_request(Stage::Operational, Some(Stage::FullFeature), &pairs);
    let mut collected = BytesMut::new();
    let mut step = t.step(&r.to_pdu());
    let mut pdus = 0;
    loop {
        pdus += 1;
        match step {
            LoginStep::Respond(p) => {
                let rsp = LoginResponse::parse(&p).unwrap();
                assert!(rsp.cont && !rsp.transit);
                assert!(rsp.data.len() <= LOGIN_MAX_DATA);
                collected.extend_from_slice(&rsp.data);
                let empty = raw_request(Stage::Operational, Some(Stage::FullFeature), &[]);
                step = t.step(&empty.to_pdu());
            }
            LoginStep::Complete { response, .. } => {
                let rsp = LoginResponse::parse(&response).unwrap();
                assert!(!rsp.cont && rsp.transit);
                collected.extend_from_slice(&rsp.data);
                break;
            }
            LoginStep::Failed { status, .. } => panic!("{status}"),
        }
    }
    assert!(pdus >= 2);
    let answers = keys::parse(&collected).unwrap();
    for (k, _) in &names {
        assert_eq!(keys::get(&answers, k), Some("NotUnderstood"));
    }
    assert!(keys::get(&answers, "MaxRecvDataSegmentLength").is_some());
}

#[test]
fn initiator_reports_target_status_and_redirect() {
    let mut i = InitiatorLogin::new(InitiatorLoginConfig::new(
        INITIATOR,
        ISID,
        Some(TARGET.into()),
    ));
    let req = LoginRequest::parse(&i.start()).unwrap();
    assert!(req.transit);
    assert_eq!(req.nsg, Stage::Operational);
    let pairs = keys::parse(&req.data).unwrap();
    assert_eq!(keys::get(&pairs, "InitiatorName"), Some(INITIATOR));
    assert_eq!(keys::get(&pairs, "SessionType"), Some("Normal"));
    assert_eq!(keys::get(&pairs, "TargetName"), Some(TARGET));
    assert_eq!(keys::get(&pairs, "AuthMethod"), Some("None"));
    let mut b = keys::TextBuilder::new();
    b.push("TargetAddress", "10.0.0.2:3260,1");
    let rsp = LoginResponse {
        transit: false,
        cont: false,
        csg: Stage::Security,
        nsg: Stage::Security,
        version_max: 0,
        version_active: 0,
        isid: ISID,
        tsih: 0,
        itt: 0,
        stat_sn: 0,
        exp_cmd_sn: 1,
        max_cmd_sn: 1,
        status_class: 1,
        status_detail: 1,
        data: b.finish(),
    };
    match i.step(&rsp.to_pdu()) {
        Err(LoginError::Status { status, redirect }) => {
            assert_eq!(status, LoginStatus::TARGET_MOVED_TEMPORARILY);
            assert_eq!(redirect.as_deref(), Some("10.0.0.2:3260,1"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn redirect_reaches_the_initiator() {
    let mut i = InitiatorLogin::new(InitiatorLoginConfig::new(
        INITIATOR,
        ISID,
        Some(TARGET.into()),
    ));
    let first = i.start();
    let rsp = redirect_login(&wire(&first), true, "[::1]:3261,2", 5);
    let parsed = LoginResponse::parse(&rsp).unwrap();
    assert_eq!((parsed.status_class, parsed.status_detail), (1, 2));
    assert_eq!(parsed.isid, ISID);
    match i.step(&wire(&rsp)) {
        Err(LoginError::Status { status, redirect }) => {
            assert_eq!(status, LoginStatus::TARGET_MOVED_PERMANENTLY);
            assert_eq!(redirect.as_deref(), Some("[::1]:3261,2"));
        }
        other => panic!("{other:?}"),
    }
    let rsp = reject_login(&first, LoginStatus::SERVICE_UNAVAILABLE, 0);
    let mut i = InitiatorLogin::new(InitiatorLoginConfig::new(
        INITIATOR,
        ISID,
        Some(TARGET.into()),
    ));
    i.start();
    let e = i.step(&rsp).unwrap_err();
    assert_eq!(
        e.to_string(),
        "login rejected by target: 0x0301 (service unavailable)"
    );
}

#[test]
fn digest_preferences_meet() {
    let mut tcfg = target_cfg();
    tcfg.prefs = OperationalPrefs {
        header_digest: vec![Digest::Crc32c],
        data_digest: vec![Digest::Crc32c, Digest::None],
        ..OperationalPrefs::default()
    };
    let mut icfg = InitiatorLoginConfig::new(INITIATOR, ISID, Some(TARGET.into()));
    icfg.prefs.header_digest = vec![Digest::None, Digest::Crc32c];
    icfg.prefs.data_digest = vec![Digest::None, Digest::Crc32c];
    let (ts, is, _) = expect_ok(run(tcfg.clone(), icfg.clone()));
    assert!(ts.params.header_digest && is.params.header_digest);
    assert!(!ts.params.data_digest && !is.params.data_digest);
    // initiator that refuses digests against a target that requires them:
    // HeaderDigest=Reject leaves the default (None) in force on both sides.
    icfg.prefs.header_digest = vec![Digest::None];
    let (ts, is, _) = expect_ok(run(tcfg, icfg));
    assert!(!ts.params.header_digest && !is.params.header_digest);
}

fn login_response(csg: Stage, transit: Option<Stage>, cont: bool, data: Bytes, tsih: u16) -> Pdu {
    LoginResponse {
        transit: transit.is_some(),
        cont,
        csg,
        nsg: transit.unwrap_or(csg),
        version_max: 0,
        version_active: 0,
        isid: ISID,
        tsih,
        itt: 0,
        stat_sn: 10,
        exp_cmd_sn: 1,
        max_cmd_sn: 8,
        status_class: 0,
        status_detail: 0,
        data,
    }
    .to_pdu()
}

/// The initiator answers keys the target offers, collects a response the
/// target split with the C bit, and checks the target's answers.
#[test]
fn initiator_handles_target_offers_and_split_responses() {
    let mut i = InitiatorLogin::new(InitiatorLoginConfig::new(
        INITIATOR,
        ISID,
        Some(TARGET.into()),
    ));
    i.start();
    let mut b = keys::TextBuilder::new();
    b.push("AuthMethod", "None")
        .push("TargetPortalGroupTag", "3");
    let step = i
        .step(&login_response(
            Stage::Security,
            Some(Stage::Operational),
            false,
            b.finish(),
            0,
        ))
        .unwrap();
    let InitiatorStep::Send(req) = step else {
        panic!()
    };
    let req = LoginRequest::parse(&req).unwrap();
    assert_eq!(req.csg, Stage::Operational);
    assert_eq!((req.transit, req.nsg), (true, Stage::FullFeature));
    assert_eq!(req.exp_stat_sn, 11);
    let offered = keys::parse(&req.data).unwrap();
    assert_eq!(keys::get(&offered, "ErrorRecoveryLevel"), Some("0"));
    assert_eq!(
        keys::get(&offered, "MaxRecvDataSegmentLength"),
        Some("262144")
    );

    // target answers part of it in two PDUs (C bit) and offers its own keys
    let mut b = keys::TextBuilder::new();
    b.push("HeaderDigest", "None")
        .push("DataDigest", "None")
        .push("MaxBurstLength", "65536")
        .push("X-com.example.TargetKey", "1")
        .push("MaxRecvDataSegmentLength", "32768")
        .push("iSCSIProtocolLevel", "1");
    let text = b.finish();
    let step = i
        .step(&login_response(
            Stage::Operational,
            None,
            true,
            text.slice(..30),
            0,
        ))
        .unwrap();
    let InitiatorStep::Send(req) = step else {
        panic!()
    };
    let req = LoginRequest::parse(&req).unwrap();
    assert!(req.data.is_empty() && !req.transit && !req.cont);
    let step = i
        .step(&login_response(
            Stage::Operational,
            None,
            false,
            text.slice(30..),
            0,
        ))
        .unwrap();
    let InitiatorStep::Send(req) = step else {
        panic!()
    };
    let req = LoginRequest::parse(&req).unwrap();
    let answers = keys::parse(&req.data).unwrap();
    assert_eq!(
        keys::get(&answers, "X-com.example.TargetKey"),
        Some("NotUnderstood")
    );
    assert_eq!(keys::get(&answers, "iSCSIProtocolLevel"), Some("1"));
    assert!(keys::get(&answers, "MaxBurstLength").is_none());
    assert!(req.transit);

    // final response: answers the rest, TSIH assigned
    let mut b = keys::TextBuilder::new();
    b.push("ImmediateData", "Yes").push("InitialR2T", "Yes");
    let step = i
        .step(&login_response(
            Stage::Operational,
            Some(Stage::FullFeature),
            false,
            b.finish(),
            9,
        ))
        .unwrap();
    let InitiatorStep::Complete(s) = step else {
        panic!()
    };
    assert_eq!(s.tsih, 9);
    assert_eq!(s.target_portal_group_tag, Some(3));
    assert_eq!(s.params.max_burst_length, 65536);
    assert_eq!(s.params.max_send_data_segment_length, 32768);
    assert!(s.params.initial_r2t && s.params.immediate_data);
    assert_eq!(s.exp_stat_sn, 11);
    assert_eq!(s.max_cmd_sn, 8);
}

#[test]
fn initiator_rejects_protocol_violations() {
    let start = || {
        let mut i = InitiatorLogin::new(InitiatorLoginConfig::new(
            INITIATOR,
            ISID,
            Some(TARGET.into()),
        ));
        i.start();
        i
    };
    // final response without TSIH
    let mut i = start();
    let e = i
        .step(&login_response(
            Stage::Security,
            Some(Stage::FullFeature),
            false,
            Bytes::new(),
            0,
        ))
        .unwrap_err();
    assert!(matches!(e, LoginError::Protocol(_)), "{e:?}");
    // answer above our Min offer
    let mut i = start();
    i.step(&login_response(
        Stage::Security,
        Some(Stage::Operational),
        false,
        Bytes::new(),
        0,
    ))
    .unwrap();
    let mut b = keys::TextBuilder::new();
    b.push("MaxBurstLength", "99999999");
    let e = i
        .step(&login_response(
            Stage::Operational,
            None,
            false,
            b.finish(),
            0,
        ))
        .unwrap_err();
    assert!(matches!(e, LoginError::Negotiation(_)), "{e:?}");
    // wrong CSG
    let mut i = start();
    let e = i
        .step(&login_response(
            Stage::Operational,
            None,
            false,
            Bytes::new(),
            0,
        ))
        .unwrap_err();
    assert!(matches!(e, LoginError::Protocol(_)));
    // target chooses CHAP while we have no credentials
    let mut i = start();
    let mut b = keys::TextBuilder::new();
    b.push("AuthMethod", "CHAP");
    let e = i
        .step(&login_response(Stage::Security, None, false, b.finish(), 0))
        .unwrap_err();
    assert!(matches!(e, LoginError::Auth(_)));
    // not a login response
    let mut i = start();
    assert!(i.step(&Pdu::from_bhs([0x20; 48])).is_err());
}
