//! Arbitrary input never panics: codec, typed parsing, text keys, login.

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::codec::PduCodec;
use keyfence_iscsi::login::{InitiatorLogin, InitiatorLoginConfig, TargetLogin, TargetLoginConfig};
use keyfence_iscsi::pdu::{InitiatorPdu, Pdu, TargetPdu, BHS_LEN};
use keyfence_iscsi::text::{parse_send_targets, parse_target_address, TextContext, TextResponder};
use keyfence_iscsi::{keys, TextRequest};
use proptest::prelude::*;

fn codecs() -> Vec<PduCodec> {
    let mut v = Vec::new();
    for hd in [false, true] {
        for dd in [false, true] {
            let mut c = PduCodec::new();
            c.set_header_digest(hd);
            c.set_data_digest(dd);
            c.set_max_recv_data_segment_length(4096);
            v.push(c);
        }
    }
    v
}

/// A header whose length fields are small, so decode gets past them.
fn small_pdu() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(any::<u8>(), BHS_LEN),
        0u8..4,
        0u32..300,
        proptest::collection::vec(any::<u8>(), 0..1400),
    )
        .prop_map(|(mut bhs, ahs, dsl, tail)| {
            bhs[4] = ahs;
            bhs[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
            bhs.extend_from_slice(&tail);
            bhs
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        for mut c in codecs() {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                let before = buf.len();
                match c.decode(&mut buf) {
                    Ok(Some(p)) => {
                        let _ = InitiatorPdu::parse(&p);
                        let _ = TargetPdu::parse(&p);
                    }
                    Ok(None) => { prop_assert_eq!(buf.len(), before); break }
                    Err(e) => { if e.is_fatal() { break } }
                }
                if buf.len() == before { break }
            }
        }
    }

    #[test]
    fn decode_plausible_headers_never_panics(bytes in small_pdu()) {
        for mut c in codecs() {
            let mut buf = BytesMut::from(&bytes[..]);
            if let Ok(Some(p)) = c.decode(&mut buf) {
                let _ = InitiatorPdu::parse(&p);
                let _ = TargetPdu::parse(&p);
                // and whatever parses re-encodes to something that decodes
                if let Ok(t) = InitiatorPdu::parse(&p) {
                    let again = t.to_pdu();
                    prop_assert_eq!(InitiatorPdu::parse(&again).ok(), Some(t));
                }
                if let Ok(t) = TargetPdu::parse(&p) {
                    let again = t.to_pdu();
                    prop_assert_eq!(TargetPdu::parse(&again).ok(), Some(t));
                }
            }
        }
    }

    #[test]
    fn typed_parse_of_any_header_and_segments(
        bhs in proptest::collection::vec(any::<u8>(), BHS_LEN),
        ahs in proptest::collection::vec(any::<u8>(), 0..64),
        data in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut b = [0u8; BHS_LEN];
        b.copy_from_slice(&bhs);
        let p = Pdu::new(b, Bytes::from(ahs), Bytes::from(data));
        let _ = InitiatorPdu::parse(&p);
        let _ = TargetPdu::parse(&p);
    }

    #[test]
    fn text_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600), s in ".{0,40}") {
        let _ = keys::parse(&data);
        let _ = parse_send_targets(&data);
        let _ = parse_target_address(&s);
        let _ = keys::decode_binary(&s);
        let _ = keys::parse_number(&s);
    }

    #[test]
    fn login_machines_survive_garbage(
        pdus in proptest::collection::vec((proptest::collection::vec(any::<u8>(), BHS_LEN), proptest::collection::vec(any::<u8>(), 0..200)), 1..6)
    ) {
        let mut t = TargetLogin::new(TargetLoginConfig { targets: vec!["iqn.t".into()], ..TargetLoginConfig::default() });
        let mut i = InitiatorLogin::new(InitiatorLoginConfig::new("iqn.i", 1, Some("iqn.t".into())));
        let _ = i.start();
        let mut r = TextResponder::new();
        let ctx = TextContext { targets: &[], session_target: None, max_send_data_segment_length: 512 };
        for (bhs, data) in pdus {
            let mut b = [0u8; BHS_LEN];
            b.copy_from_slice(&bhs);
            let mut p = Pdu::new(b, Bytes::new(), Bytes::from(data));
            // make most of them login PDUs so the state machines go deeper
            p.bhs[0] = 0x43;
            let _ = t.step(&p);
            p.bhs[0] = 0x23;
            let _ = i.step(&p);
            p.bhs[0] = 0x04;
            if let Ok(req) = TextRequest::parse(&p) {
                let _ = r.handle(&req, &ctx);
            }
        }
    }
}
