//! Scenario tests: three initiators against each reservation type, and
//! every service action's rules and errors.

mod common;

use common::*;
use keyfence_pr::{Access, Persist, PrState, PR_INFORMATION_LOST};
use keyfence_scsi::pr_data::{
    Capabilities, PrInAction, PrOutAction, PrOutCdb, PrOutParams, PrType, RegisterMoveParams,
};
use keyfence_scsi::sense::asc;
use keyfence_scsi::transport_id::TransportId;

const KA: u64 = 0xaaaa;
const KB: u64 = 0xbbbb;
const KC: u64 = 0xcccc;

/// A (holder), B (registered), C (not registered) under each type.
#[test]
fn three_initiators_each_type() {
    for t in PrType::ALL {
        let mut lu = Lu::default();
        let (a, b, c) = (a(), b(), c());
        lu.register(&a, KA);
        lu.register(&b, KB);
        assert_eq!(st_of(&lu.reserve(&a, KA, t)), St::Good, "{t:?}");

        // READ RESERVATION: key 0 for all-registrants types.
        let r = lu.reservation().reservation.unwrap();
        assert_eq!(r.pr_type, t.code());
        assert_eq!(r.key, if t.all_registrants() { 0 } else { KA });

        // Holder: everything.
        assert!(lu.can_read(&a) && lu.can_write(&a), "{t:?}");
        // Registered non-holder (libiscsi test_prout_reserve_access_*).
        let (b_read, b_write) = match t {
            PrType::WriteExclusive => (true, false),
            PrType::ExclusiveAccess => (false, false),
            _ => (true, true),
        };
        assert_eq!(
            (lu.can_read(&b), lu.can_write(&b)),
            (b_read, b_write),
            "{t:?}"
        );
        // Not registered: reads only through Write Exclusive types.
        assert_eq!(lu.can_read(&c), t.write_exclusive(), "{t:?}");
        assert!(!lu.can_write(&c), "{t:?}");
        // Everybody may INQUIRY / REPORT LUNS / PR IN / TEST UNIT READY.
        for cdb in [
            &[0x12u8, 0, 0, 0, 36, 0][..],
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0],
            &[0x5e, 0, 0, 0, 0, 0, 0, 0, 8, 0],
            &[0, 0, 0, 0, 0, 0],
        ] {
            assert_eq!(lu.access(&c, cdb), Access::Allowed, "{t:?} {cdb:x?}");
        }

        // The holder unregisters.
        let e = lu.unregister(&a, KA).unwrap();
        if t.all_registrants() {
            // B is still registered and now the (only) holder.
            let r = lu.reservation().reservation.unwrap();
            assert_eq!((r.key, r.pr_type), (0, t.code()));
            assert!(lu.can_write(&b), "{t:?}");
            assert!(e.unit_attentions.is_empty());
            // The last registrant leaves: the reservation goes with it.
            let e = lu.unregister(&b, KB).unwrap();
            assert!(e.unit_attentions.is_empty());
            assert!(lu.reservation().reservation.is_none(), "{t:?}");
        } else {
            assert!(lu.reservation().reservation.is_none(), "{t:?}");
            assert!(lu.can_write(&b) && lu.can_write(&c));
            if t.registrants_only() {
                assert_eq!(
                    uas(&e),
                    vec![(b.clone(), asc::RESERVATIONS_RELEASED)],
                    "{t:?}"
                );
            } else {
                assert!(e.unit_attentions.is_empty(), "{t:?}");
            }
        }
    }
}

/// RELEASE: UAs only for registrants-only and all-registrants types, to
/// every registrant but the releasing nexus, never to non-registrants.
#[test]
fn release_unit_attentions_per_type() {
    for t in PrType::ALL {
        let mut lu = Lu::default();
        let (a, b, c) = (a(), b(), c());
        let b2 = nx("iqn.2026-11.test:b", 1, 2); // same initiator, other port
        lu.register(&a, KA);
        lu.register(&b, KB);
        lu.register(&b2, KB);
        lu.reserve(&a, KA, t).unwrap();
        let holder = if t.all_registrants() { &b } else { &a };
        let hkey = if t.all_registrants() { KB } else { KA };
        // Wrong type from the holder: INVALID RELEASE OF PERSISTENT RESERVATION.
        let other = if t == PrType::WriteExclusive {
            PrType::ExclusiveAccess
        } else {
            PrType::WriteExclusive
        };
        assert_eq!(
            st_of(&lu.release(holder, hkey, other)),
            INVALID_RELEASE,
            "{t:?}"
        );
        assert!(lu.reservation().reservation.is_some());
        // From a non-registered nexus: conflict; from a registered
        // non-holder: GOOD and nothing happens.
        assert_eq!(st_of(&lu.release(&c, KC, t)), St::Conflict);
        if !t.all_registrants() {
            let g = lu.st.generation;
            assert_eq!(st_of(&lu.release(&b, KB, t)), St::Good);
            assert!(lu.reservation().reservation.is_some());
            assert_eq!(lu.st.generation, g);
        }
        let e = lu.release(holder, hkey, t).unwrap();
        assert!(lu.reservation().reservation.is_none());
        let mut expect: Vec<_> = if t.registrants_type() {
            [&a, &b, &b2]
                .into_iter()
                .filter(|n| *n != holder)
                .map(|n| (n.clone(), asc::RESERVATIONS_RELEASED))
                .collect()
        } else {
            vec![]
        };
        expect.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(uas(&e), expect, "{t:?}");
        // Registrations are kept.
        assert_eq!(lu.keys().keys.len(), 3);
    }
}

#[test]
fn generation_rules() {
    let mut lu = Lu::default();
    let (a, b, c) = (a(), b(), c());
    assert_eq!(lu.keys().generation, 0);
    // Unregistered nexus, both keys zero: do nothing.
    lu.out(&a, PrOutAction::Register, None, &params(0, 0))
        .unwrap();
    assert_eq!(lu.st.generation, 0);
    lu.out(&a, PrOutAction::Register, None, &params(0, KA))
        .unwrap();
    assert_eq!(lu.st.generation, 1);
    // Same key again is still a REGISTER that completed.
    lu.out(&a, PrOutAction::Register, None, &params(KA, KA))
        .unwrap();
    assert_eq!(lu.st.generation, 2);
    lu.register(&b, KB);
    assert_eq!(lu.st.generation, 3);
    lu.reserve(&a, KA, PrType::WriteExclusive).unwrap();
    lu.release(&a, KA, PrType::WriteExclusive).unwrap();
    assert_eq!(lu.st.generation, 3, "RESERVE/RELEASE leave PRgeneration");
    // Failures leave it too.
    assert_eq!(
        st_of(&lu.out(&c, PrOutAction::Register, None, &params(5, 6))),
        St::Conflict
    );
    assert_eq!(
        st_of(&lu.reserve(&c, 0, PrType::WriteExclusive)),
        St::Conflict
    );
    assert_eq!(lu.st.generation, 3);
    lu.reserve(&a, KA, PrType::WriteExclusive).unwrap();
    lu.preempt(&b, KB, KA, PrType::ExclusiveAccess, false)
        .unwrap();
    assert_eq!(lu.st.generation, 4);
    lu.out(&b, PrOutAction::Clear, None, &params(KB, 0))
        .unwrap();
    assert_eq!(lu.st.generation, 5);
    assert_eq!(lu.keys().generation, 5);
    assert!(lu.keys().keys.is_empty());
}

#[test]
fn register_key_rules() {
    let mut lu = Lu::default();
    let (a, b) = (a(), b());
    // Unregistered with a non-zero reservation key: conflict.
    assert_eq!(
        st_of(&lu.out(&a, PrOutAction::Register, None, &params(1, 2))),
        St::Conflict
    );
    lu.out(&a, PrOutAction::Register, None, &params(0, KA))
        .unwrap();
    // Registered: wrong key conflicts; right key changes it.
    assert_eq!(
        st_of(&lu.out(&a, PrOutAction::Register, None, &params(KB, 7))),
        St::Conflict
    );
    lu.out(&a, PrOutAction::Register, None, &params(KA, 7))
        .unwrap();
    assert_eq!(lu.keys().keys, vec![7]);
    // REGISTER AND IGNORE EXISTING KEY ignores the reservation key.
    lu.out(
        &a,
        PrOutAction::RegisterAndIgnoreExistingKey,
        None,
        &params(12345, KA),
    )
    .unwrap();
    assert_eq!(lu.keys().keys, vec![KA]);
    // Duplicate keys are reported twice.
    lu.register(&b, KA);
    assert_eq!(lu.keys().keys, vec![KA, KA]);
    // SPEC_I_PT from a registered nexus: INVALID FIELD IN PARAMETER LIST.
    let p = PrOutParams {
        reservation_key: KA,
        service_action_key: 9,
        spec_i_pt: true,
        transport_ids: vec![tid(&c())],
        ..Default::default()
    };
    let r = lu.out(&a, PrOutAction::Register, None, &p);
    assert_eq!(st_of(&r), INVALID_FIELD_PARAM);
    // Other service actions from an unregistered nexus: conflict.
    let c = c();
    for sa in [
        PrOutAction::Reserve,
        PrOutAction::Release,
        PrOutAction::Clear,
        PrOutAction::Preempt,
        PrOutAction::PreemptAndAbort,
    ] {
        let r = lu.out(&c, sa, Some(PrType::WriteExclusive), &params(0, KA));
        assert_eq!(st_of(&r), St::Conflict, "{sa:?}");
    }
}

#[test]
fn reserve_rules() {
    let mut lu = Lu::default();
    let (a, b) = (a(), b());
    lu.register(&a, KA);
    lu.register(&b, KB);
    lu.reserve(&a, KA, PrType::ExclusiveAccess).unwrap();
    // Same type again from the holder: GOOD, nothing changes.
    assert_eq!(
        st_of(&lu.reserve(&a, KA, PrType::ExclusiveAccess)),
        St::Good
    );
    // Holder changing the type: conflict.
    assert_eq!(
        st_of(&lu.reserve(&a, KA, PrType::WriteExclusive)),
        St::Conflict
    );
    // Someone else: conflict.
    assert_eq!(
        st_of(&lu.reserve(&b, KB, PrType::ExclusiveAccess)),
        St::Conflict
    );
    // Wrong key from the holder: conflict.
    assert_eq!(
        st_of(&lu.reserve(&a, KB, PrType::ExclusiveAccess)),
        St::Conflict
    );
}

#[test]
fn cdb_and_parameter_list_errors() {
    let mut lu = Lu::default();
    let a = a();
    lu.register(&a, KA);
    let basic = params(KA, 0).encode();
    // 23 and 25 bytes: PARAMETER LIST LENGTH ERROR.
    for len in [0usize, 23, 25] {
        let mut d = basic.clone();
        d.resize(len, 0);
        let cdb = PrOutCdb::new(
            PrOutAction::Reserve,
            Some(PrType::WriteExclusive),
            len as u32,
        )
        .encode();
        assert_eq!(st_of(&lu.raw(&a, &cdb, &d)), PLLE, "len {len}");
    }
    // Reserved / obsolete type codes and a non-LU scope: INVALID FIELD IN CDB.
    for (scope, ty, bit) in [
        (0u8, 0u8, 3u8),
        (0, 2, 3),
        (0, 4, 3),
        (0, 9, 3),
        (1, 1, 7),
        (2, 3, 7),
    ] {
        let mut cdb = PrOutCdb::new(PrOutAction::Reserve, None, 24).encode();
        cdb[2] = (scope << 4) | ty;
        let r = lu.raw(&a, &cdb, &basic);
        assert_eq!(st_of(&r), INVALID_FIELD_CDB);
        let s = match r {
            Err(keyfence_pr::Refusal::Check(s)) => s,
            _ => unreachable!(),
        };
        let f = s.field.unwrap();
        assert!(f.in_cdb);
        assert_eq!((f.byte, f.bit), (2, Some(bit)));
    }
    // The reservation key is verified first (SPC-5 6.16.3): an
    // unregistered nexus gets RESERVATION CONFLICT even with a bad TYPE.
    let mut cdb = PrOutCdb::new(PrOutAction::Reserve, None, 24).encode();
    cdb[2] = 0x12;
    assert_eq!(
        st_of(&lu.raw(&c(), &cdb, &params(0, 0).encode())),
        St::Conflict
    );
    // Unknown service action.
    let mut cdb = PrOutCdb::new(PrOutAction::Register, None, 24).encode();
    cdb[1] = 0x09;
    assert_eq!(st_of(&lu.raw(&a, &cdb, &basic)), INVALID_FIELD_CDB);
    // SPEC_I_PT with RESERVE: INVALID FIELD IN PARAMETER LIST at byte 20 bit 3.
    let mut d = basic.clone();
    d[20] = 0x08;
    let cdb = PrOutCdb::new(PrOutAction::Reserve, Some(PrType::WriteExclusive), 24).encode();
    match lu.raw(&a, &cdb, &d) {
        Err(keyfence_pr::Refusal::Check(s)) => {
            assert_eq!((s.asc, s.ascq), (0x26, 0));
            let f = s.field.unwrap();
            assert_eq!((f.in_cdb, f.byte, f.bit), (false, 20, Some(3)));
        }
        other => panic!("{other:?}"),
    }
    // Parameter list shorter than the CDB says: length error.
    let cdb = PrOutCdb::new(PrOutAction::Reserve, Some(PrType::WriteExclusive), 24).encode();
    assert_eq!(st_of(&lu.raw(&a, &cdb, &basic[..10])), PLLE);
    assert!(lu.st.reservation.is_none());
}

#[test]
fn spec_i_pt_all_or_nothing() {
    let (a, b, c) = (a(), b(), c());
    let p = |tids: Vec<TransportId>| PrOutParams {
        service_action_key: KA,
        spec_i_pt: true,
        transport_ids: tids,
        ..Default::default()
    };
    // Success: A, B and C registered with A's key through A's port.
    let mut lu = Lu::default();
    lu.out(&a, PrOutAction::Register, None, &p(vec![tid(&b), tid(&c)]))
        .unwrap();
    assert_eq!(lu.keys().keys, vec![KA, KA, KA]);
    assert!(lu.st.is_registered(&b) && lu.st.is_registered(&c));
    assert_eq!(lu.st.generation, 1);

    // One TransportID names a registered nexus: nothing registered.
    let mut lu = Lu::default();
    lu.register(&c, KC);
    let g = lu.st.generation;
    let r = lu.out(&a, PrOutAction::Register, None, &p(vec![tid(&b), tid(&c)]));
    assert_eq!(st_of(&r), INVALID_FIELD_PARAM);
    assert!(!lu.st.is_registered(&a) && !lu.st.is_registered(&b));
    assert_eq!(lu.st.generation, g);

    // Format 00b (iSCSI name only): every initiator port known with that
    // name (SPC-5 7.6.4.6), here two ISIDs of B; an unknown name adds none.
    let name_only = |n: &str| TransportId::Iscsi {
        name: n.into(),
        isid: None,
    };
    let b7 = nx("iqn.2026-11.test:b", 7, 1);
    let mut lu2 = Lu {
        known: vec![
            b.initiator.clone(),
            b7.initiator.clone(),
            c.initiator.clone(),
        ],
        ..Lu::default()
    };
    lu2.out(
        &a,
        PrOutAction::Register,
        None,
        &p(vec![
            name_only("iqn.2026-11.test:b"),
            name_only("iqn.2026-11.test:nobody"),
        ]),
    )
    .unwrap();
    assert_eq!(lu2.keys().keys, vec![KA, KA, KA]);
    assert!(lu2.st.is_registered(&b) && lu2.st.is_registered(&b7));
    assert!(!lu2.st.is_registered(&c));
    // ... and it fails as a whole if one of those ports is registered.
    let mut lu3 = Lu {
        known: lu2.known.clone(),
        ..Lu::default()
    };
    lu3.register(&b7, KB);
    let r = lu3.out(
        &a,
        PrOutAction::Register,
        None,
        &p(vec![name_only("iqn.2026-11.test:b")]),
    );
    assert_eq!(st_of(&r), INVALID_FIELD_PARAM);
    assert_eq!(lu3.keys().keys, vec![KB]);

    // Non-iSCSI TransportID: rejected, nothing registered.
    let fc = TransportId::FibreChannel {
        n_port_name: 0x2100_0000_0000_0001,
    };
    assert_eq!(
        st_of(&lu.out(&a, PrOutAction::Register, None, &p(vec![fc]))),
        INVALID_FIELD_PARAM
    );
    assert!(!lu.st.is_registered(&a));

    // SPEC_I_PT with REGISTER AND IGNORE EXISTING KEY: invalid.
    let r = lu.out(
        &a,
        PrOutAction::RegisterAndIgnoreExistingKey,
        None,
        &p(vec![tid(&b)]),
    );
    assert_eq!(st_of(&r), INVALID_FIELD_PARAM);

    // With ALL_TG_PT: every TransportID on every target port.
    let mut lu = Lu::default();
    let mut q = p(vec![tid(&b)]);
    q.all_tg_pt = true;
    lu.out(&a, PrOutAction::Register, None, &q).unwrap();
    assert_eq!(lu.keys().keys.len(), 4);
    assert!(lu.st.is_registered(&nx("iqn.2026-11.test:b", 1, 2)));
    assert!(lu.full().descriptors.iter().all(|d| d.all_tg_pt));
}

#[test]
fn all_tg_pt_and_full_status() {
    let mut lu = Lu::default();
    let (a, b) = (a(), b());
    let p = PrOutParams {
        service_action_key: KA,
        all_tg_pt: true,
        ..Default::default()
    };
    lu.out(&a, PrOutAction::Register, None, &p).unwrap();
    lu.register(&b, KB);
    lu.reserve(&a, KA, PrType::ExclusiveAccessRegistrantsOnly)
        .unwrap();
    let a2 = nx("iqn.2026-11.test:a", 1, 2);
    assert!(lu.st.is_registered(&a2));
    let f = lu.full();
    assert_eq!(f.generation, 2);
    assert_eq!(f.descriptors.len(), 3);
    let d0 = &f.descriptors[0];
    assert_eq!(
        (
            d0.key,
            d0.r_holder,
            d0.all_tg_pt,
            d0.pr_type,
            d0.relative_target_port
        ),
        (KA, true, true, 6, 1)
    );
    assert_eq!(d0.transport_id, tid(&a));
    assert!(matches!(
        &d0.transport_id,
        TransportId::Iscsi { isid: Some(1), .. }
    ));
    let d1 = &f.descriptors[1];
    assert_eq!(
        (
            d1.key,
            d1.r_holder,
            d1.all_tg_pt,
            d1.pr_type,
            d1.relative_target_port
        ),
        (KA, false, true, 0, 2)
    );
    let d2 = &f.descriptors[2];
    assert_eq!((d2.key, d2.r_holder, d2.all_tg_pt), (KB, false, false));
    // A registered via port 2 may write under EA_RO (registered), but is
    // not the holder.
    assert!(lu.can_write(&a2));
    // Unregister with ALL_TG_PT removes both registrations of A; the
    // reservation (held through port 1) is released, B is told.
    let p = PrOutParams {
        reservation_key: KA,
        all_tg_pt: true,
        ..Default::default()
    };
    let e = lu.out(&a, PrOutAction::Register, None, &p).unwrap();
    assert_eq!(lu.keys().keys, vec![KB]);
    assert!(lu.st.reservation.is_none());
    assert_eq!(uas(&e), vec![(b.clone(), asc::RESERVATIONS_RELEASED)]);
}

#[test]
fn preempt_holder_changes_type_and_notifies() {
    let mut lu = Lu::default();
    let (a, b, c) = (a(), b(), c());
    let a2 = nx("iqn.2026-11.test:a", 2, 1); // another port with A's key
    lu.register(&a, KA);
    lu.register(&a2, KA);
    lu.register(&b, KB);
    lu.register(&c, KC);
    lu.reserve(&a, KA, PrType::WriteExclusive).unwrap();
    let e = lu
        .preempt(&b, KB, KA, PrType::ExclusiveAccess, true)
        .unwrap();
    // A and A2 lose their registrations; C keeps its registration but the
    // type changed: RESERVATIONS RELEASED.
    let mut expect = vec![
        (a.clone(), asc::REGISTRATIONS_PREEMPTED),
        (a2.clone(), asc::REGISTRATIONS_PREEMPTED),
        (c.clone(), asc::RESERVATIONS_RELEASED),
    ];
    expect.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(uas(&e), expect);
    let mut aborted = e.abort_tasks_of.clone();
    aborted.sort();
    let mut want = vec![a.clone(), a2.clone()];
    want.sort();
    assert_eq!(aborted, want);
    assert_eq!(lu.keys().keys, vec![KB, KC]);
    let r = lu.reservation().reservation.unwrap();
    assert_eq!((r.key, r.pr_type), (KB, PrType::ExclusiveAccess.code()));
    assert!(!lu.can_read(&a));

    // Same type: no RESERVATIONS RELEASED.
    let e = lu
        .preempt(&c, KC, KB, PrType::ExclusiveAccess, false)
        .unwrap();
    assert_eq!(uas(&e), vec![(b.clone(), asc::REGISTRATIONS_PREEMPTED)]);
    assert!(e.abort_tasks_of.is_empty());

    // The holder preempting itself changes the type, keeps registration.
    let e = lu
        .preempt(&c, KC, KC, PrType::WriteExclusive, false)
        .unwrap();
    assert!(e.unit_attentions.is_empty());
    assert_eq!(lu.keys().keys, vec![KC]);
    assert_eq!(lu.reservation().reservation.unwrap().pr_type, 1);
}

#[test]
fn preempt_key_rules() {
    let mut lu = Lu::default();
    let (a, b, c) = (a(), b(), c());
    lu.register(&a, KA);
    lu.register(&b, KB);
    // No reservation, key zero: INVALID FIELD IN PARAMETER LIST.
    assert_eq!(
        st_of(&lu.preempt(&a, KA, 0, PrType::WriteExclusive, false)),
        INVALID_FIELD_PARAM
    );
    // Key nobody has: conflict.
    assert_eq!(
        st_of(&lu.preempt(&a, KA, 0x999, PrType::WriteExclusive, false)),
        St::Conflict
    );
    // No reservation: removes registrations only, creates none.
    let e = lu
        .preempt(&a, KA, KB, PrType::WriteExclusive, false)
        .unwrap();
    assert_eq!(uas(&e), vec![(b.clone(), asc::REGISTRATIONS_PREEMPTED)]);
    assert!(lu.st.reservation.is_none());
    // Non-AR reservation, key zero: invalid.
    lu.register(&b, KB);
    lu.reserve(&a, KA, PrType::ExclusiveAccess).unwrap();
    assert_eq!(
        st_of(&lu.preempt(&b, KB, 0, PrType::ExclusiveAccess, false)),
        INVALID_FIELD_PARAM
    );
    // Non-holder key: removes that registration, reservation stays.
    lu.register(&c, KC);
    let e = lu
        .preempt(&b, KB, KC, PrType::WriteExclusive, false)
        .unwrap();
    assert_eq!(uas(&e), vec![(c.clone(), asc::REGISTRATIONS_PREEMPTED)]);
    let r = lu.reservation().reservation.unwrap();
    assert_eq!((r.key, r.pr_type), (KA, 3));
    // Preempting one's own key (not holder): registration removed, no UA.
    let e = lu
        .preempt(&b, KB, KB, PrType::WriteExclusive, false)
        .unwrap();
    assert!(e.unit_attentions.is_empty());
    assert!(!lu.st.is_registered(&b));
}

#[test]
fn preempt_all_registrants() {
    for t in [
        PrType::WriteExclusiveAllRegistrants,
        PrType::ExclusiveAccessAllRegistrants,
    ] {
        let mut lu = Lu::default();
        let (a, b, c) = (a(), b(), c());
        lu.register(&a, KA);
        lu.register(&b, KB);
        lu.register(&c, KC);
        lu.reserve(&a, KA, t).unwrap();
        // Non-zero key: remove that registration only.
        let e = lu.preempt(&a, KA, KC, t, false).unwrap();
        assert_eq!(uas(&e), vec![(c.clone(), asc::REGISTRATIONS_PREEMPTED)]);
        assert_eq!(lu.reservation().reservation.unwrap().pr_type, t.code());
        // Zero key: everyone else goes, new reservation for the preemptor.
        lu.register(&c, KC);
        let e = lu.preempt(&b, KB, 0, PrType::WriteExclusive, true).unwrap();
        let mut expect = vec![
            (a.clone(), asc::REGISTRATIONS_PREEMPTED),
            (c.clone(), asc::REGISTRATIONS_PREEMPTED),
        ];
        expect.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(uas(&e), expect);
        // Key zero under all-registrants: every registered nexus's tasks,
        // the preemptor's included (its PR OUT excepted by the LU).
        let mut ab = e.abort_tasks_of.clone();
        ab.sort();
        let mut want = vec![a.clone(), b.clone(), c.clone()];
        want.sort();
        assert_eq!(ab, want);
        assert_eq!(lu.keys().keys, vec![KB]);
        let r = lu.reservation().reservation.unwrap();
        assert_eq!((r.key, r.pr_type), (KB, 1));
    }
}

#[test]
fn clear_notifies_everyone_else() {
    let mut lu = Lu::default();
    let (a, b, c) = (a(), b(), c());
    lu.register(&a, KA);
    lu.register(&b, KB);
    lu.reserve(&a, KA, PrType::WriteExclusive).unwrap();
    assert_eq!(
        st_of(&lu.out(&c, PrOutAction::Clear, None, &params(0, 0))),
        St::Conflict
    );
    let e = lu
        .out(&b, PrOutAction::Clear, None, &params(KB, 0))
        .unwrap();
    assert_eq!(uas(&e), vec![(a.clone(), asc::RESERVATIONS_PREEMPTED)]);
    assert!(lu.keys().keys.is_empty());
    assert!(lu.st.reservation.is_none());
    assert!(lu.can_write(&c));
}

fn move_params(
    dest: &keyfence_pr::state::Registration,
    rel: u16,
    unreg: bool,
) -> RegisterMoveParams {
    RegisterMoveParams {
        reservation_key: KA,
        service_action_key: dest.key,
        unreg,
        aptpl: false,
        relative_target_port: rel,
        transport_id: tid(&dest.nexus),
    }
}

#[test]
fn register_and_move() {
    let (a, b, c) = (a(), b(), c());
    let dest = keyfence_pr::state::Registration {
        nexus: b.clone(),
        key: KB,
        all_tg_pt: false,
    };
    let mut lu = Lu::default();
    lu.register(&a, KA);
    // No reservation: ILLEGAL REQUEST, INVALID FIELD IN CDB.
    assert_eq!(
        st_of(&lu.move_to(&a, &move_params(&dest, 1, false))),
        INVALID_FIELD_CDB
    );
    lu.reserve(&a, KA, PrType::ExclusiveAccess).unwrap();
    // Wrong key, unregistered nexus, non-holder: conflict.
    let mut p = move_params(&dest, 1, false);
    p.reservation_key = 1;
    assert_eq!(st_of(&lu.move_to(&a, &p)), St::Conflict);
    assert_eq!(
        st_of(&lu.move_to(&c, &move_params(&dest, 1, false))),
        St::Conflict
    );
    // To itself: invalid; unknown relative port: invalid (byte 18);
    // zero key: invalid (byte 8).
    let me = keyfence_pr::state::Registration {
        nexus: a.clone(),
        key: KA,
        all_tg_pt: false,
    };
    assert_eq!(
        st_of(&lu.move_to(&a, &move_params(&me, 2, false))),
        INVALID_FIELD_PARAM
    );
    match lu.move_to(&a, &move_params(&dest, 7, false)) {
        Err(keyfence_pr::Refusal::Check(s)) => assert_eq!(s.field.unwrap().byte, 18),
        other => panic!("{other:?}"),
    }
    let mut p = move_params(&dest, 1, false);
    p.service_action_key = 0;
    assert_eq!(st_of(&lu.move_to(&a, &p)), INVALID_FIELD_PARAM);
    assert_eq!(lu.st.generation, 1);

    // Move to B through port 2, keep A registered.
    let e = lu.move_to(&a, &move_params(&dest, 2, false)).unwrap();
    assert!(e.unit_attentions.is_empty());
    let b2 = nx("iqn.2026-11.test:b", 1, 2);
    assert!(lu.st.is_holder(&b2));
    assert!(!lu.st.is_holder(&a) && lu.st.is_registered(&a));
    let r = lu.reservation().reservation.unwrap();
    assert_eq!((r.key, r.pr_type), (KB, 3));
    assert_eq!(lu.st.generation, 2);
    assert!(!lu.can_read(&a) && lu.can_write(&b2));

    // B2 moves it on to C with UNREG: B2 unregistered.
    let dest_c = keyfence_pr::state::Registration {
        nexus: c.clone(),
        key: KC,
        all_tg_pt: false,
    };
    let mut p = move_params(&dest_c, 1, true);
    p.reservation_key = KB;
    lu.move_to(&b2, &p).unwrap();
    assert!(!lu.st.is_registered(&b2));
    assert!(lu.st.is_holder(&c));
    assert_eq!(lu.keys().keys, vec![KA, KC]);

    // A name-only TransportID moves to the one known port of that name;
    // with two known ports of the name it is ambiguous and refused.
    let mut lu = Lu {
        known: vec![b.initiator.clone()],
        ..Lu::default()
    };
    lu.register(&a, KA);
    lu.reserve(&a, KA, PrType::WriteExclusive).unwrap();
    let mut p = move_params(&dest, 1, false);
    p.transport_id = TransportId::Iscsi {
        name: "iqn.2026-11.test:b".into(),
        isid: None,
    };
    lu.known.push(nx("iqn.2026-11.test:b", 9, 1).initiator);
    assert_eq!(st_of(&lu.move_to(&a, &p)), INVALID_FIELD_PARAM);
    lu.known.pop();
    lu.move_to(&a, &p).unwrap();
    assert!(lu.st.is_holder(&b));

    // All-registrants reservations cannot be moved.
    let mut lu = Lu::default();
    lu.register(&a, KA);
    lu.reserve(&a, KA, PrType::WriteExclusiveAllRegistrants)
        .unwrap();
    assert_eq!(
        st_of(&lu.move_to(&a, &move_params(&dest, 1, false))),
        St::Conflict
    );
}

#[test]
fn replace_lost_reservation() {
    let a = a();
    let p = PrOutParams {
        service_action_key: KA,
        ..Default::default()
    };
    // Nothing lost: ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION.
    let mut lu = Lu::default();
    let r = lu.out(
        &a,
        PrOutAction::ReplaceLostReservation,
        Some(PrType::ExclusiveAccess),
        &p,
    );
    assert_eq!(st_of(&r), INVALID_RELEASE);

    // Lost: everything but the SPC-5 5.13.5.2 list fails with DATA PROTECT.
    let b = b();
    let mut lu = Lu {
        st: PrState {
            lost: true,
            ..PrState::default()
        },
        ..Lu::default()
    };
    assert_eq!(lu.access(&a, &READ10), Access::Check(PR_INFORMATION_LOST));
    assert_eq!(
        lu.access(&a, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 8, 0]),
        Access::Check(PR_INFORMATION_LOST)
    );
    assert_eq!(lu.access(&a, &[0x12, 0, 0, 0, 36, 0]), Access::Allowed);
    assert_eq!(
        st_of(&lu.out(&a, PrOutAction::RegisterAndIgnoreExistingKey, None, &p)),
        St::Check(7, 0x44, 1)
    );
    // RLR with a non-zero reservation key is refused.
    let bad = params(1, KA);
    assert_eq!(
        st_of(&lu.out(
            &a,
            PrOutAction::ReplaceLostReservation,
            Some(PrType::ExclusiveAccess),
            &bad
        )),
        INVALID_FIELD_PARAM
    );
    let e = lu
        .out(
            &a,
            PrOutAction::ReplaceLostReservation,
            Some(PrType::ExclusiveAccess),
            &p,
        )
        .unwrap();
    assert_eq!(e.persist, Some(Persist::Erase));
    assert!(!lu.st.lost);
    assert_eq!(lu.st.generation, 0);
    assert_eq!(lu.keys().keys, vec![KA]);
    assert!(lu.st.is_holder(&a));
    assert!(!lu.can_read(&b));
    assert!(lu.can_write(&a));
}

#[test]
fn report_capabilities_is_true() {
    let lu = Lu::default();
    let c = Capabilities::decode(&lu.pr_in(PrInAction::ReportCapabilities)).unwrap();
    assert!(c.rlr_c && c.crh && c.sip_c && c.atp_c && c.ptpl_c && c.tmv);
    assert!(!c.ptpl_a);
    assert_eq!(c.allow_commands, 3);
    for t in PrType::ALL {
        assert!(c.supports(t));
    }
    let mut lu = Lu::default();
    let p = PrOutParams {
        service_action_key: 1,
        aptpl: true,
        ..Default::default()
    };
    lu.out(&a(), PrOutAction::Register, None, &p).unwrap();
    let c = Capabilities::decode(&lu.pr_in(PrInAction::ReportCapabilities)).unwrap();
    assert!(c.ptpl_a);
    // Invalid PR IN service action.
    let mut cdb = keyfence_scsi::pr_data::PrInCdb::new(PrInAction::ReadKeys, 8).encode();
    cdb[1] = 4;
    assert!(
        matches!(keyfence_pr::pr_in(&lu.st, &cdb, lu.features), Err(keyfence_pr::Refusal::Check(s)) if s.asc == 0x24)
    );
}

#[test]
fn persistence_effects_follow_aptpl() {
    let mut lu = Lu::default();
    let a = a();
    let e = lu
        .out(
            &a,
            PrOutAction::Register,
            None,
            &PrOutParams {
                service_action_key: KA,
                aptpl: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(matches!(e.persist, Some(Persist::Save(ref s)) if s.registrations.len() == 1));
    let e = lu.reserve(&a, KA, PrType::WriteExclusive).unwrap();
    assert!(matches!(e.persist, Some(Persist::Save(ref s)) if s.reservation.is_some()));
    // No change: nothing to persist.
    let e = lu.reserve(&a, KA, PrType::WriteExclusive).unwrap();
    assert_eq!(e.persist, None);
    // APTPL cleared: the persisted copy must go.
    let e = lu
        .out(&a, PrOutAction::Register, None, &params(KA, KB))
        .unwrap();
    assert_eq!(e.persist, Some(Persist::Erase));
    let e = lu
        .out(&a, PrOutAction::Register, None, &params(KB, KA))
        .unwrap();
    assert_eq!(e.persist, None);
    // Without PTPL_C, APTPL=1 is refused.
    let mut lu = Lu {
        features: keyfence_pr::Features { ptpl_c: false },
        ..Lu::default()
    };
    let r = lu.out(
        &a,
        PrOutAction::Register,
        None,
        &PrOutParams {
            service_action_key: KA,
            aptpl: true,
            ..Default::default()
        },
    );
    assert_eq!(st_of(&r), INVALID_FIELD_PARAM);
}

#[test]
fn serde_roundtrip_of_state() {
    let mut lu = Lu::default();
    let (a, b) = (a(), b());
    lu.register(&a, u64::MAX);
    lu.register(&b, KB);
    lu.reserve(&a, u64::MAX, PrType::ExclusiveAccessRegistrantsOnly)
        .unwrap();
    let j = serde_json::to_string(&lu.st).unwrap();
    let back: PrState = serde_json::from_str(&j).unwrap();
    assert!(back.durable_eq(&lu.st));
    let rec: keyfence_pr::StateRecord = serde_json::from_str(&j).unwrap();
    assert!(rec.validate().is_ok());
}

mod spc2 {
    use super::*;

    fn cmd(op: u8) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = op;
        c
    }

    fn run(lu: &mut Lu, n: &keyfence_scsi::Nexus, op: u8) -> St {
        let r = keyfence_pr::spc2(&lu.st, n, &cmd(op)).map(|a| {
            lu.st = a.state;
            a.effects
        });
        st_of(&r)
    }

    #[test]
    fn reserve_release_and_loss() {
        let mut lu = Lu::default();
        let (a, b) = (a(), b());
        assert_eq!(run(&mut lu, &a, 0x16), St::Good);
        assert_eq!(run(&mut lu, &a, 0x56), St::Good, "re-reserve by holder");
        assert_eq!(run(&mut lu, &b, 0x16), St::Conflict);
        assert_eq!(lu.access(&b, &READ10), Access::Conflict);
        assert_eq!(lu.access(&b, &[0x12, 0, 0, 0, 36, 0]), Access::Allowed);
        assert_eq!(
            lu.access(&b, &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0]),
            Access::Conflict
        );
        assert_eq!(lu.access(&a, &WRITE10), Access::Allowed);
        // RELEASE from another nexus: GOOD, no effect.
        assert_eq!(run(&mut lu, &b, 0x17), St::Good);
        assert_eq!(lu.st.spc2.as_ref(), Some(&a));
        // Nexus loss releases it; so does a reset.
        lu.st = keyfence_pr::on_nexus_loss(&lu.st, &a).unwrap();
        assert!(lu.can_write(&b));
        assert_eq!(run(&mut lu, &b, 0x16), St::Good);
        assert!(keyfence_pr::on_nexus_loss(&lu.st, &a).is_none());
        lu.st = keyfence_pr::on_reset(&lu.st).unwrap();
        assert!(lu.st.spc2.is_none());
        // Third-party / extent bits: INVALID FIELD IN CDB.
        let mut c = cmd(0x16);
        c[1] = 0x10;
        assert_eq!(
            st_of(&keyfence_pr::spc2(&lu.st, &a, &c).map(|x| x.effects)),
            INVALID_FIELD_CDB
        );
    }

    #[test]
    fn crh_exceptions() {
        let mut lu = Lu::default();
        let (a, b, c) = (a(), b(), c());
        lu.register(&a, KA);
        lu.register(&b, KB);
        // Registrations exist, no reservation: RESERVE/RELEASE conflict.
        assert_eq!(run(&mut lu, &c, 0x16), St::Conflict);
        assert_eq!(run(&mut lu, &a, 0x57), St::Conflict);
        lu.reserve(&a, KA, PrType::WriteExclusive).unwrap();
        // The PR holder: GOOD, nothing changes.
        assert_eq!(run(&mut lu, &a, 0x16), St::Good);
        assert_eq!(run(&mut lu, &a, 0x17), St::Good);
        assert!(lu.st.spc2.is_none());
        assert!(lu.st.reservation.is_some());
        // Registered non-holder under WE: conflict.
        assert_eq!(run(&mut lu, &b, 0x16), St::Conflict);
        lu.release(&a, KA, PrType::WriteExclusive).unwrap();
        lu.reserve(&a, KA, PrType::WriteExclusiveRegistrantsOnly)
            .unwrap();
        // Registered under a registrants-only type: GOOD, nothing changes.
        assert_eq!(run(&mut lu, &b, 0x56), St::Good);
        assert!(lu.st.spc2.is_none());
        assert_eq!(run(&mut lu, &c, 0x56), St::Conflict);
    }
}
