//! SendTargets: target responder and initiator collector, with responses
//! split over several Text Responses.

use std::net::SocketAddr;

use keyfence_iscsi::codec::PduCodec;
use keyfence_iscsi::keys;
use keyfence_iscsi::pdu::{Pdu, TextRequest, TextResponse, RESERVED_TAG};
use keyfence_iscsi::text::*;

fn wire(p: &Pdu) -> Pdu {
    let mut c = PduCodec::new();
    c.set_max_send_data_segment_length(1 << 20);
    c.set_max_recv_data_segment_length(1 << 20);
    let mut b = bytes::BytesMut::new();
    c.encode(p, &mut b).unwrap();
    c.decode(&mut b).unwrap().unwrap()
}

fn targets(n: usize) -> Vec<SendTargetsEntry> {
    (0..n)
        .map(|i| SendTargetsEntry {
            name: format!("iqn.2026-11.org.keyfence:disk{i:04}"),
            addresses: vec![
                (format_address("127.0.0.1:3260".parse().unwrap()), 1),
                (format_address("[::1]:3261".parse().unwrap()), 2),
            ],
        })
        .collect()
}

/// Runs a SendTargets exchange; returns the targets and the number of
/// Text Responses it took.
fn exchange(
    value: &str,
    all: &[SendTargetsEntry],
    session_target: Option<&str>,
    max: u32,
) -> (Bytes, usize) {
    let mut responder = TextResponder::new();
    let ctx = TextContext {
        targets: all,
        session_target,
        max_send_data_segment_length: max,
    };
    let mut collector = TextCollector::new(0x77);
    let mut req = send_targets_request(0x77, value);
    for n in 1..1000 {
        let req_wire = TextRequest::parse(&wire(&req.to_pdu())).unwrap();
        let rsp = responder.handle(&req_wire, &ctx).unwrap();
        assert!(rsp.data.len() <= max.max(512) as usize);
        let rsp = TextResponse::parse(&wire(&rsp.to_pdu())).unwrap();
        match collector.push(&rsp).unwrap() {
            TextProgress::Continue(next) => {
                assert!(rsp.cont && !rsp.final_bit);
                assert_ne!(rsp.ttt, RESERVED_TAG);
                assert_eq!(next.ttt, rsp.ttt);
                assert!(next.data.is_empty());
                req = next;
            }
            TextProgress::Done(text) => {
                assert!(rsp.final_bit);
                assert_eq!(rsp.ttt, RESERVED_TAG);
                return (text, n);
            }
        }
    }
    panic!("no end");
}

use bytes::Bytes;

#[test]
fn address_formatting_and_parsing() {
    let v4: SocketAddr = "192.0.2.1:3260".parse().unwrap();
    let v6: SocketAddr = "[fe80::1]:860".parse().unwrap();
    assert_eq!(format_address(v4), "192.0.2.1:3260");
    assert_eq!(format_address(v6), "[fe80::1]:860");
    assert_eq!(
        parse_target_address("192.0.2.1:3260,1").unwrap(),
        ("192.0.2.1:3260".to_string(), 1)
    );
    assert_eq!(
        parse_target_address("[fe80::1]:860,12").unwrap(),
        ("[fe80::1]:860".to_string(), 12)
    );
    assert_eq!(
        parse_target_address("[::1],3").unwrap(),
        ("[::1]:3260".to_string(), 3)
    );
    assert_eq!(
        parse_target_address("storage.example").unwrap(),
        ("storage.example:3260".to_string(), 1)
    );
    assert!(parse_target_address("[::1:3260,1").is_err());
    assert!(parse_target_address("host:port,1").is_err());
    assert!(parse_target_address("host:3260,x").is_err());
    assert!(parse_target_address(",1").is_err());
    assert!(parse_target_address("[::1]x,1").is_err());
}

#[test]
fn send_targets_all_in_one_response() {
    let all = targets(3);
    let (text, n) = exchange("All", &all, None, 8192);
    assert_eq!(n, 1);
    let found = parse_send_targets(&text).unwrap();
    assert_eq!(found, all);
    assert!(std::str::from_utf8(&text)
        .unwrap()
        .contains("TargetAddress=[::1]:3261,2\0"));
}

#[test]
fn send_targets_split_over_many_responses() {
    let all = targets(200); // ~25 KB of text
    let (text, n) = exchange("All", &all, None, 1024);
    assert!(n > 20, "took {n} responses");
    assert_eq!(parse_send_targets(&text).unwrap(), all);
    // a minimum of 512 bytes per PDU even if the initiator declared less
    let (text, _) = exchange("All", &all, None, 100);
    assert_eq!(parse_send_targets(&text).unwrap(), all);
}

#[test]
fn send_targets_scoping() {
    let all = targets(3);
    // one named target in discovery
    let (text, _) = exchange(&all[1].name, &all, None, 8192);
    assert_eq!(parse_send_targets(&text).unwrap(), vec![all[1].clone()]);
    // unknown name: empty answer
    let (text, _) = exchange("iqn.nope", &all, None, 8192);
    assert!(parse_send_targets(&text).unwrap().is_empty());
    // normal session: empty is its own target; All lists the targets
    // the caller lets it see (as Linux's target does)
    let own = all[2].name.clone();
    let (text, _) = exchange("", &all, Some(&own), 8192);
    assert_eq!(parse_send_targets(&text).unwrap(), vec![all[2].clone()]);
    let (text, _) = exchange("All", &all, Some(&own), 8192);
    assert_eq!(parse_send_targets(&text).unwrap(), all);
    let (text, _) = exchange("All", &all[2..], Some(&own), 8192);
    assert_eq!(parse_send_targets(&text).unwrap(), vec![all[2].clone()]);
    // values that are neither All, empty nor an iSCSI name: Reject
    for bad in ["all", "ALL", "not a name", "foo", "iqn.", "iqn.x\u{1}"] {
        for session in [None, Some(own.as_str())] {
            let (text, _) = exchange(bad, &all, session, 8192);
            let pairs = keys::parse(&text).unwrap();
            assert_eq!(keys::get(&pairs, "SendTargets"), Some("Reject"), "{bad:?}");
            assert!(parse_send_targets(&text).is_err());
        }
    }
}

#[test]
fn other_keys_and_bad_continuations() {
    let all = targets(1);
    let ctx = TextContext {
        targets: &all,
        session_target: None,
        max_send_data_segment_length: 8192,
    };
    let mut r = TextResponder::new();
    let mut b = keys::TextBuilder::new();
    b.push("X-vendor", "1").push("MaxBurstLength", "1024");
    let req = TextRequest {
        immediate: true,
        final_bit: true,
        cont: false,
        lun: Default::default(),
        itt: 1,
        ttt: RESERVED_TAG,
        cmd_sn: 0,
        exp_stat_sn: 0,
        data: b.finish(),
    };
    let rsp = r.handle(&req, &ctx).unwrap();
    let pairs = keys::parse(&rsp.data).unwrap();
    assert_eq!(keys::get(&pairs, "X-vendor"), Some("NotUnderstood"));
    assert_eq!(keys::get(&pairs, "MaxBurstLength"), Some("Reject"));

    // a TTT we never issued
    let mut bad = req.clone();
    bad.ttt = 1234;
    assert_eq!(r.handle(&bad, &ctx), Err(TextError::UnknownTtt(1234)));

    // malformed text
    let mut bad = req.clone();
    bad.data = Bytes::from_static(b"novalue\0");
    assert!(matches!(r.handle(&bad, &ctx), Err(TextError::Keys(_))));

    // initiator splits its request with the C bit
    let whole = {
        let mut b = keys::TextBuilder::new();
        b.push("SendTargets", "All");
        b.finish()
    };
    let mut first = req.clone();
    first.final_bit = false;
    first.cont = true;
    first.data = whole.slice(..5);
    let rsp = r.handle(&first, &ctx).unwrap();
    assert!(rsp.data.is_empty() && !rsp.final_bit && !rsp.cont);
    let mut second = req.clone();
    second.ttt = rsp.ttt;
    second.data = whole.slice(5..);
    let rsp = r.handle(&second, &ctx).unwrap();
    assert!(rsp.final_bit);
    assert_eq!(parse_send_targets(&rsp.data).unwrap(), all);

    // collector refuses a response of another task
    let mut c = TextCollector::new(5);
    assert!(matches!(c.push(&rsp), Err(TextError::WrongItt { .. })));
    // SendTargets answer with an address before any name
    assert!(parse_send_targets(b"TargetAddress=1.2.3.4:3260,1\0").is_err());
}
