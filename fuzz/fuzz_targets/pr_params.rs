//! Arbitrary bytes through the PR parameter-list and TransportID decoders,
//! and iSCSI text parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use keyfence_scsi::pr_data::{FullStatus, PrOutParams, ReadKeys, ReadReservation, RegisterMoveParams};
use keyfence_scsi::transport_id::TransportId;

fuzz_target!(|data: &[u8]| {
    let _ = PrOutParams::decode(data);
    let _ = RegisterMoveParams::decode(data);
    let _ = ReadKeys::decode(data);
    let _ = ReadReservation::decode(data);
    let _ = FullStatus::decode(data);
    let _ = TransportId::parse(data);
    let _ = TransportId::parse_list(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = TransportId::parse_iscsi_text(text);
    }
});
