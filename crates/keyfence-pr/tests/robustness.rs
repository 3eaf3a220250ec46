//! Hostile input: arbitrary CDBs and parameter lists never panic, and a
//! rejected command never changes anything.

mod common;

use common::*;
use keyfence_pr::{PrState, Registration, MAX_REGISTRATIONS};
use keyfence_scsi::pr_data::{PrOutAction, PrOutCdb, PrOutParams, PrType};
use keyfence_scsi::transport_id::TransportId;
use proptest::prelude::*;

proptest! {
    #[test]
    fn pr_out_never_panics(
        b1 in any::<u8>(), b2 in any::<u8>(), len in 0u32..80,
        data in prop::collection::vec(any::<u8>(), 0..80),
        setup in 0u8..3,
    ) {
        let mut lu = Lu::default();
        let (a, b) = (a(), b());
        if setup > 0 { lu.register(&a, 1); lu.register(&b, 2); }
        if setup > 1 { lu.reserve(&a, 1, PrType::WriteExclusive).unwrap(); }
        let before = lu.st.clone();
        let mut cdb = PrOutCdb::new(PrOutAction::Register, None, len).encode();
        cdb[1] = b1;
        cdb[2] = b2;
        let r = keyfence_pr::pr_out(&lu.st, &a, &lu.ctx(), &cdb, &data);
        if r.is_err() {
            prop_assert_eq!(&lu.st, &before);
        }
        let _ = keyfence_pr::pr_in(&lu.st, &[0x5e, b1, 0, 0, 0, 0, 0, 0, b2, 0], lu.features);
        let _ = keyfence_pr::spc2(&lu.st, &a, &[0x16, b1, b2, 0, 0, 0]);
        let _ = keyfence_pr::check_access(&lu.st, &b, &data);
    }
}

#[test]
fn insufficient_registration_resources() {
    let st = PrState {
        registrations: (0..MAX_REGISTRATIONS as u64)
            .map(|i| Registration {
                nexus: nx("iqn.2026-11.test:many", i, 1),
                key: i + 1,
                all_tg_pt: false,
            })
            .collect(),
        ..PrState::default()
    };
    let mut lu = Lu {
        st,
        ..Lu::default()
    };
    let r = lu.out(&a(), PrOutAction::Register, None, &params(0, 7));
    assert_eq!(st_of(&r), St::Check(5, 0x55, 0x04));
    assert_eq!(lu.st.registrations.len(), MAX_REGISTRATIONS);
    // Changing an existing key needs no new resources.
    let n0 = nx("iqn.2026-11.test:many", 0, 1);
    lu.out(&n0, PrOutAction::Register, None, &params(1, 9))
        .unwrap();
}

#[test]
fn field_pointer_names_the_offending_transport_id() {
    // A padded first TransportID (additional length 40 instead of the
    // minimal 24) shifts the second; the pointer must follow the bytes.
    let mut lu = Lu::default();
    let (a, c) = (a(), c());
    lu.register(&c, 3);
    let mut first = tid(&b()).encode();
    let pad = 16;
    first.resize(first.len() + pad, 0);
    let add = u16::from_be_bytes([first[2], first[3]]) + pad as u16;
    first[2..4].copy_from_slice(&add.to_be_bytes());
    let second = tid(&c).encode();
    let mut data = PrOutParams {
        service_action_key: 1,
        spec_i_pt: true,
        ..Default::default()
    }
    .encode();
    data.truncate(24);
    data.extend_from_slice(&((first.len() + second.len()) as u32).to_be_bytes());
    data.extend_from_slice(&first);
    data.extend_from_slice(&second);
    assert!(matches!(TransportId::parse(&first), Ok((_, n)) if n == first.len()));
    let cdb = PrOutCdb::new(PrOutAction::Register, None, data.len() as u32).encode();
    match lu.raw(&a, &cdb, &data) {
        Err(keyfence_pr::Refusal::Check(s)) => {
            assert_eq!((s.asc, s.ascq), (0x26, 0));
            assert_eq!(s.field.unwrap().byte as usize, 28 + first.len());
        }
        other => panic!("{other:?}"),
    }
    assert!(!lu.st.is_registered(&a));
}
