//! Arbitrary bytes through the iSCSI framer (with and without digests) and
//! every typed PDU parser: errors are fine, panics are not.
#![no_main]

use bytes::BytesMut;
use keyfence_iscsi::codec::PduCodec;
use keyfence_iscsi::pdu::{InitiatorPdu, TargetPdu};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut codec = PduCodec::new();
    codec.set_header_digest(mode & 1 != 0);
    codec.set_data_digest(mode & 2 != 0);
    codec.set_max_recv_data_segment_length(8192);
    let mut buf = BytesMut::from(rest);
    // Bounded: each successful decode consumes at least one header.
    for _ in 0..64 {
        match codec.decode(&mut buf) {
            Ok(Some(pdu)) => {
                let _ = InitiatorPdu::parse(&pdu);
                let _ = TargetPdu::parse(&pdu);
                let _ = keyfence_iscsi::keys::parse(&pdu.data);
                let mut out = BytesMut::new();
                let _ = codec.encode(&pdu, &mut out);
            }
            Ok(None) => break,
            Err(e) => {
                if e.is_fatal() {
                    break;
                }
            }
        }
    }
});
