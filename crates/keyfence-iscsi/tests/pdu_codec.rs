//! PDU round trips through the codec, wire layout checks, digests and
//! incremental decoding.

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::codec::{crc32c, CodecError, PduCodec};
use keyfence_iscsi::pdu::*;

fn codec(hd: bool, dd: bool) -> PduCodec {
    let mut c = PduCodec::new();
    c.set_header_digest(hd);
    c.set_data_digest(dd);
    c.set_max_recv_data_segment_length(1 << 20);
    c.set_max_send_data_segment_length(1 << 20);
    c
}

fn wire(c: &PduCodec, pdu: &Pdu) -> BytesMut {
    let mut out = BytesMut::new();
    c.encode(pdu, &mut out).unwrap();
    out
}

/// Encodes, decodes (whole and byte by byte) and returns the decoded PDU.
fn through(c: &mut PduCodec, pdu: &Pdu) -> Pdu {
    let mut buf = wire(c, pdu);
    let total = buf.len();
    assert_eq!(total % 4, 0, "PDUs are 4-byte aligned");
    assert_eq!(total, c.encoded_len(pdu.ahs.len(), pdu.data.len()));
    // two PDUs back to back
    buf.extend_from_slice(&wire(c, pdu));
    let a = c.decode(&mut buf).unwrap().unwrap();
    assert_eq!(buf.len(), total);
    let b = c.decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    assert_eq!(a, b);
    assert_eq!(c.decode(&mut buf).unwrap(), None);

    // byte at a time
    let bytes = wire(c, pdu);
    let mut feed = BytesMut::new();
    let mut got = None;
    for (i, byte) in bytes.iter().enumerate() {
        feed.extend_from_slice(&[*byte]);
        match c.decode(&mut feed).unwrap() {
            None => assert!(i + 1 < bytes.len(), "complete PDU not decoded"),
            Some(p) => {
                assert_eq!(i + 1, bytes.len(), "decoded before complete");
                got = Some(p);
            }
        }
    }
    let got = got.unwrap();
    assert_eq!(got, a);
    got
}

fn all_codecs() -> Vec<PduCodec> {
    vec![
        codec(false, false),
        codec(true, false),
        codec(false, true),
        codec(true, true),
    ]
}

fn lun(n: u16) -> Lun {
    Lun::from_number(n).unwrap()
}

macro_rules! roundtrip {
    ($ty:ident, $v:expr) => {{
        let v: $ty = $v;
        for mut c in all_codecs() {
            let pdu = v.to_pdu();
            let back = through(&mut c, &pdu);
            assert_eq!($ty::parse(&back).unwrap(), v, "{}", stringify!($ty));
        }
        v
    }};
}

#[test]
fn every_pdu_round_trips() {
    roundtrip!(
        NopOut,
        NopOut {
            immediate: true,
            lun: lun(3),
            itt: 7,
            ttt: RESERVED_TAG,
            cmd_sn: 100,
            exp_stat_sn: 55,
            data: Bytes::from_static(b"ping!"),
        }
    );
    roundtrip!(
        ScsiCommand,
        ScsiCommand {
            immediate: false,
            final_bit: false,
            read: false,
            write: true,
            attr: TaskAttr::Ordered,
            lun: lun(300),
            itt: 0x1234_5678,
            expected_data_transfer_length: 4096,
            cmd_sn: 0xffff_fffe,
            exp_stat_sn: 9,
            cdb: Cdb::new(&[0x2a, 0, 0, 0, 0, 8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
            bidi_read_length: None,
            data: Bytes::from(vec![0xa5; 1023]),
        }
    );
    // 32-byte variable-length CDB (extended CDB AHS) with bidi read length
    let long_cdb: Vec<u8> = (0..32).map(|i| 0x7f ^ i as u8).collect();
    let cmd = roundtrip!(
        ScsiCommand,
        ScsiCommand {
            immediate: false,
            final_bit: true,
            read: true,
            write: true,
            attr: TaskAttr::Simple,
            lun: lun(0),
            itt: 1,
            expected_data_transfer_length: 512,
            cmd_sn: 2,
            exp_stat_sn: 3,
            cdb: Cdb::new(&long_cdb).unwrap(),
            bidi_read_length: Some(8192),
            data: Bytes::new(),
        }
    );
    assert_eq!(cmd.cdb.as_slice(), &long_cdb[..]);
    roundtrip!(
        TaskMgmtRequest,
        TaskMgmtRequest {
            immediate: true,
            function: TmfFunction::AbortTask,
            lun: lun(1),
            itt: 10,
            referenced_task_tag: 9,
            cmd_sn: 11,
            exp_stat_sn: 12,
            ref_cmd_sn: 8,
            exp_data_sn: 0,
        }
    );
    roundtrip!(
        LoginRequest,
        LoginRequest {
            transit: true,
            cont: false,
            csg: Stage::Security,
            nsg: Stage::Operational,
            version_max: 0,
            version_min: 0,
            isid: 0x0000_8000_1234_5678 & 0xffff_ffff_ffff,
            tsih: 0,
            itt: 0,
            cid: 1,
            cmd_sn: 1,
            exp_stat_sn: 0,
            data: Bytes::from_static(b"InitiatorName=iqn.x\0"),
        }
    );
    roundtrip!(
        TextRequest,
        TextRequest {
            immediate: true,
            final_bit: false,
            cont: true,
            lun: Lun::default(),
            itt: 4,
            ttt: RESERVED_TAG,
            cmd_sn: 5,
            exp_stat_sn: 6,
            data: Bytes::from_static(b"SendTargets=All\0"),
        }
    );
    roundtrip!(
        DataOut,
        DataOut {
            final_bit: true,
            lun: lun(2),
            itt: 77,
            ttt: 0x10,
            exp_stat_sn: 5,
            data_sn: 3,
            buffer_offset: 65536,
            data: Bytes::from(vec![1u8; 4097]),
        }
    );
    roundtrip!(
        LogoutRequest,
        LogoutRequest {
            immediate: true,
            reason: LogoutReason::CloseSession,
            itt: 99,
            cid: 0,
            cmd_sn: 44,
            exp_stat_sn: 43,
        }
    );
    roundtrip!(
        SnackRequest,
        SnackRequest {
            snack_type: SnackType::Status,
            lun: lun(0),
            itt: 5,
            ttt: RESERVED_TAG,
            exp_stat_sn: 3,
            beg_run: 1,
            run_length: 0,
        }
    );
    roundtrip!(
        NopIn,
        NopIn {
            lun: lun(0),
            itt: RESERVED_TAG,
            ttt: 0x55,
            stat_sn: 1,
            exp_cmd_sn: 2,
            max_cmd_sn: 33,
            data: Bytes::new(),
        }
    );
    roundtrip!(
        ScsiResponse,
        ScsiResponse {
            response: 0,
            status: 0x02,
            residual: Residual::Underflow(512),
            bidi_read_residual: Residual::None,
            itt: 8,
            snack_tag: 0,
            stat_sn: 20,
            exp_cmd_sn: 21,
            max_cmd_sn: 52,
            exp_data_sn: 0,
            sense: Bytes::from_static(&[
                0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0
            ]),
            response_data: Bytes::new(),
        }
    );
    roundtrip!(
        TaskMgmtResponse,
        TaskMgmtResponse {
            response: TmfResponse::TaskDoesNotExist,
            itt: 10,
            stat_sn: 11,
            exp_cmd_sn: 12,
            max_cmd_sn: 13,
        }
    );
    roundtrip!(
        LoginResponse,
        LoginResponse {
            transit: true,
            cont: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_active: 0,
            isid: 0x0123_4567_89ab,
            tsih: 7,
            itt: 1,
            stat_sn: 2,
            exp_cmd_sn: 3,
            max_cmd_sn: 4,
            status_class: 0,
            status_detail: 0,
            data: Bytes::from_static(b"MaxRecvDataSegmentLength=262144\0"),
        }
    );
    roundtrip!(
        TextResponse,
        TextResponse {
            final_bit: false,
            cont: true,
            lun: Lun::default(),
            itt: 4,
            ttt: 9,
            stat_sn: 1,
            exp_cmd_sn: 2,
            max_cmd_sn: 3,
            data: Bytes::from_static(b"TargetName=iqn.t\0"),
        }
    );
    roundtrip!(
        DataIn,
        DataIn {
            final_bit: false,
            ack: false,
            status: None,
            residual: Residual::None,
            lun: lun(1),
            itt: 3,
            ttt: RESERVED_TAG,
            stat_sn: 0,
            exp_cmd_sn: 5,
            max_cmd_sn: 36,
            data_sn: 0,
            buffer_offset: 0,
            data: Bytes::from(vec![7u8; 8192]),
        }
    );
    // phase collapse: status in the last Data-In
    roundtrip!(
        DataIn,
        DataIn {
            final_bit: true,
            ack: false,
            status: Some(0),
            residual: Residual::Overflow(100),
            lun: lun(1),
            itt: 3,
            ttt: RESERVED_TAG,
            stat_sn: 17,
            exp_cmd_sn: 5,
            max_cmd_sn: 36,
            data_sn: 1,
            buffer_offset: 8192,
            data: Bytes::from(vec![9u8; 13]),
        }
    );
    roundtrip!(
        LogoutResponse,
        LogoutResponse {
            response: LogoutResponseCode::Success,
            itt: 99,
            stat_sn: 10,
            exp_cmd_sn: 45,
            max_cmd_sn: 76,
            time2wait: 2,
            time2retain: 20,
        }
    );
    roundtrip!(
        R2t,
        R2t {
            lun: lun(4),
            itt: 12,
            ttt: 0x100,
            stat_sn: 5,
            exp_cmd_sn: 6,
            max_cmd_sn: 7,
            r2t_sn: 0,
            buffer_offset: 262144,
            desired_data_transfer_length: 262144,
        }
    );
    roundtrip!(
        AsyncMessage,
        AsyncMessage {
            lun: lun(0),
            stat_sn: 3,
            exp_cmd_sn: 4,
            max_cmd_sn: 5,
            async_event: 1,
            async_vcode: 0,
            parameter1: 0,
            parameter2: 2,
            parameter3: 20,
            sense: Bytes::new(),
            event_data: Bytes::new(),
        }
    );
    let rejected = ScsiCommand::parse(&cmd.to_pdu()).unwrap().to_pdu().bhs;
    let rej = roundtrip!(
        Reject,
        Reject {
            reason: RejectReason::DataDigestError,
            stat_sn: 1,
            exp_cmd_sn: 2,
            max_cmd_sn: 3,
            data_sn: 0,
            rejected_header: Bytes::copy_from_slice(&rejected),
        }
    );
    assert_eq!(rej.rejected_itt(), Some(1));
}

#[test]
fn typed_enums_dispatch() {
    let p = NopOut {
        immediate: true,
        lun: Lun::default(),
        itt: 1,
        ttt: RESERVED_TAG,
        cmd_sn: 1,
        exp_stat_sn: 1,
        data: Bytes::new(),
    }
    .to_pdu();
    assert!(matches!(
        InitiatorPdu::parse(&p),
        Ok(InitiatorPdu::NopOut(_))
    ));
    let e = TargetPdu::parse(&p).unwrap_err();
    assert_eq!(e.reject_reason(), RejectReason::ProtocolError);
    let mut bhs = [0u8; 48];
    bhs[0] = 0x1c; // vendor specific / undefined
    let e = InitiatorPdu::parse(&Pdu::from_bhs(bhs)).unwrap_err();
    assert_eq!(e, PduError::UnknownOpcode(0x1c));
    assert_eq!(e.reject_reason(), RejectReason::CommandNotSupported);
}

/// Byte positions checked against RFC 7143 §11.3 by hand.
#[test]
fn scsi_command_wire_layout() {
    let cmd = ScsiCommand {
        immediate: false,
        final_bit: true,
        read: true,
        write: false,
        attr: TaskAttr::Simple,
        lun: lun(1),
        itt: 0x0a0b0c0d,
        expected_data_transfer_length: 0x200,
        cmd_sn: 0x11223344,
        exp_stat_sn: 0x55667788,
        cdb: Cdb::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap(),
        bidi_read_length: None,
        data: Bytes::new(),
    };
    let b = cmd.to_pdu().bhs;
    assert_eq!(b[0], 0x01);
    assert_eq!(b[1], 0x80 | 0x40 | 0x01);
    assert_eq!(&b[4..8], &[0, 0, 0, 0]);
    assert_eq!(&b[8..16], &[0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&b[16..20], &[0x0a, 0x0b, 0x0c, 0x0d]);
    assert_eq!(&b[20..24], &[0, 0, 2, 0]);
    assert_eq!(&b[24..28], &[0x11, 0x22, 0x33, 0x44]);
    assert_eq!(&b[28..32], &[0x55, 0x66, 0x77, 0x88]);
    assert_eq!(b[32], 0x28);
    assert_eq!(b[40], 1);
    // login request: I bit always set, T/CSG/NSG packing
    let l = LoginRequest {
        transit: true,
        cont: false,
        csg: Stage::Operational,
        nsg: Stage::FullFeature,
        version_max: 0,
        version_min: 0,
        isid: 0x8012_3456_789a,
        tsih: 0,
        itt: 0,
        cid: 0,
        cmd_sn: 0,
        exp_stat_sn: 0,
        data: Bytes::new(),
    }
    .to_pdu();
    assert_eq!(l.bhs[0], 0x43);
    assert_eq!(l.bhs[1], 0x80 | (1 << 2) | 3);
    assert_eq!(&l.bhs[8..14], &[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
}

#[test]
fn lun_encoding() {
    assert_eq!(Lun::from_number(0).unwrap().0, [0; 8]);
    assert_eq!(Lun::from_number(5).unwrap().0, [0, 5, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        Lun::from_number(256).unwrap().0,
        [0x41, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        Lun::from_number(0x3fff).unwrap().0,
        [0x7f, 0xff, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(Lun::from_number(0x4000), None);
    for n in [0u16, 1, 255, 256, 1000, 0x3fff] {
        assert_eq!(Lun::from_number(n).unwrap().number(), Some(n));
    }
    // flat space with number < 256 also decodes
    assert_eq!(Lun([0x40, 7, 0, 0, 0, 0, 0, 0]).number(), Some(7));
    // bus id != 0, second level, logical unit addressing: not ours
    assert_eq!(Lun([0x01, 7, 0, 0, 0, 0, 0, 0]).number(), None);
    assert_eq!(Lun([0, 7, 0, 1, 0, 0, 0, 0]).number(), None);
    assert_eq!(Lun([0x80, 7, 0, 0, 0, 0, 0, 0]).number(), None);
    assert_eq!(
        Lun::from_u64(Lun::from_number(9).unwrap().to_u64()).number(),
        Some(9)
    );
}

/// RFC 3720 Appendix B.4 CRC32C examples, as they appear on the wire.
#[test]
fn crc32c_iscsi_vectors() {
    let le = |v: u32| v.to_le_bytes();
    assert_eq!(le(crc32c(&[0u8; 32])), [0xaa, 0x36, 0x91, 0x8a]);
    assert_eq!(le(crc32c(&[0xffu8; 32])), [0x43, 0xab, 0xa8, 0x62]);
    let inc: Vec<u8> = (0u8..32).collect();
    assert_eq!(le(crc32c(&inc)), [0x4e, 0x79, 0xdd, 0x46]);
    let dec: Vec<u8> = (0u8..32).rev().collect();
    assert_eq!(le(crc32c(&dec)), [0x5c, 0xdb, 0x3f, 0x11]);
    let read_cmd: [u8; 48] = [
        0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00,
        0x00, 0x18, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00,
    ];
    assert_eq!(le(crc32c(&read_cmd)), [0x56, 0x3a, 0x96, 0xd9]);
    // and the codec puts exactly these bytes after the header
    let c = codec(true, false);
    let mut out = BytesMut::new();
    c.encode(&Pdu::from_bhs(read_cmd), &mut out).unwrap();
    assert_eq!(&out[48..52], &[0x56, 0x3a, 0x96, 0xd9]);
}

#[test]
fn digest_errors() {
    let pdu = DataOut {
        final_bit: true,
        lun: lun(0),
        itt: 5,
        ttt: 6,
        exp_stat_sn: 1,
        data_sn: 0,
        buffer_offset: 0,
        data: Bytes::from_static(b"hello"),
    }
    .to_pdu();
    let mut c = codec(true, true);
    let good = wire(&c, &pdu);
    // the data digest covers the padding: 5 data + 3 pad
    assert_eq!(good.len(), 48 + 4 + 8 + 4);
    let dd = crc32c(b"hello\0\0\0").to_le_bytes();
    assert_eq!(&good[60..64], &dd);

    // header digest mismatch: fatal, nothing consumed
    let mut bad = good.clone();
    bad[20] ^= 1;
    let e = c.decode(&mut bad).unwrap_err();
    assert!(matches!(e, CodecError::HeaderDigest { .. }));
    assert!(e.is_fatal());
    assert_eq!(e.reject(), None);

    // data digest mismatch: PDU consumed, Reject 0x02 with the header
    let mut bad = good.clone();
    bad[53] ^= 0x40;
    bad.extend_from_slice(&good);
    let e = c.decode(&mut bad).unwrap_err();
    assert!(!e.is_fatal());
    let (reason, bhs) = e.reject().unwrap();
    assert_eq!(reason, RejectReason::DataDigestError);
    assert_eq!(bhs[..], pdu.bhs[..]);
    // the next PDU decodes fine
    assert_eq!(c.decode(&mut bad).unwrap().unwrap(), pdu);
    assert!(bad.is_empty());
    let r = Reject::new(reason, bhs).to_pdu();
    assert_eq!(r.data.len(), 48);
    assert_eq!(r.itt(), RESERVED_TAG);
}

#[test]
fn data_segment_limit_and_unknown_opcode() {
    let mut c = codec(false, false);
    c.set_max_recv_data_segment_length(1024);
    let pdu = DataOut {
        final_bit: true,
        lun: lun(0),
        itt: 5,
        ttt: 6,
        exp_stat_sn: 1,
        data_sn: 0,
        buffer_offset: 0,
        data: Bytes::from(vec![0; 1025]),
    }
    .to_pdu();
    let mut buf = wire(&codec(false, false), &pdu);
    // detected from the header alone, before the data arrives
    buf.truncate(48);
    let e = c.decode(&mut buf).unwrap_err();
    assert!(matches!(
        e,
        CodecError::DataSegmentTooLong {
            length: 1025,
            limit: 1024,
            ..
        }
    ));
    assert!(e.is_fatal());
    assert_eq!(e.reject().unwrap().0, RejectReason::ProtocolError);

    // sending more than the peer accepts is refused
    c.set_max_send_data_segment_length(1024);
    let mut out = BytesMut::new();
    assert!(matches!(
        c.encode(&pdu, &mut out),
        Err(CodecError::SendTooLong { .. })
    ));

    let mut bhs = [0u8; 48];
    bhs[0] = 0x1d;
    bhs[7] = 4;
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&bhs);
    buf.extend_from_slice(b"abcd");
    buf.extend_from_slice(&wire(&c, &Pdu::from_bhs([0u8; 48])));
    let e = c.decode(&mut buf).unwrap_err();
    assert!(matches!(e, CodecError::UnknownOpcode { opcode: 0x1d, .. }));
    assert_eq!(e.reject().unwrap().0, RejectReason::CommandNotSupported);
    // consumed: the following NOP-Out decodes
    assert_eq!(
        c.decode(&mut buf).unwrap().unwrap().opcode(),
        Ok(Opcode::NopOut)
    );
}

#[test]
fn zero_copy_header_and_trailer() {
    for c in all_codecs() {
        let data = Bytes::from(vec![0x3cu8; 1001]);
        let din = DataIn {
            final_bit: true,
            ack: false,
            status: Some(0),
            residual: Residual::None,
            lun: lun(0),
            itt: 1,
            ttt: RESERVED_TAG,
            stat_sn: 2,
            exp_cmd_sn: 3,
            max_cmd_sn: 4,
            data_sn: 0,
            buffer_offset: 0,
            data: data.clone(),
        };
        let mut split = BytesMut::new();
        c.encode_header(&din.header(), &[], data.len(), &mut split)
            .unwrap();
        split.extend_from_slice(&data);
        let (t, n) = c.data_trailer(&data);
        split.extend_from_slice(&t[..n]);
        assert_eq!(split, wire(&c, &din.to_pdu()));
    }
}

#[test]
fn ahs_in_codec() {
    let mut c = codec(true, true);
    let bhs = ScsiCommand {
        immediate: false,
        final_bit: true,
        read: true,
        write: false,
        attr: TaskAttr::Simple,
        lun: lun(0),
        itt: 1,
        expected_data_transfer_length: 0,
        cmd_sn: 1,
        exp_stat_sn: 1,
        cdb: Cdb::new(&[0x7f; 20]).unwrap(),
        bidi_read_length: None,
        data: Bytes::new(),
    }
    .to_pdu();
    assert_eq!(bhs.total_ahs_length(), 2); // 3 + 1 + 4 bytes -> 8
    let back = through(&mut c, &bhs);
    assert_eq!(back.ahs.len(), 8);
    assert_eq!(
        ScsiCommand::parse(&back).unwrap().cdb.as_slice(),
        &[0x7f; 20][..]
    );
}

#[test]
fn malformed_fields_are_precise_errors() {
    let base = ScsiResponse {
        response: 0,
        status: 2,
        residual: Residual::None,
        bidi_read_residual: Residual::None,
        itt: 1,
        snack_tag: 0,
        stat_sn: 1,
        exp_cmd_sn: 1,
        max_cmd_sn: 1,
        exp_data_sn: 0,
        sense: Bytes::new(),
        response_data: Bytes::new(),
    }
    .to_pdu();
    // SenseLength larger than the segment
    let bad = Pdu::new(base.bhs, Bytes::new(), Bytes::from_static(&[0, 20, 1, 2]));
    assert!(matches!(
        ScsiResponse::parse(&bad),
        Err(PduError::BadDataSegment(_))
    ));
    let bad = Pdu::new(base.bhs, Bytes::new(), Bytes::from_static(&[0]));
    assert!(ScsiResponse::parse(&bad).is_err());
    // both O and U
    let mut b = base.bhs;
    b[1] |= 0x06;
    assert!(matches!(
        ScsiResponse::parse(&Pdu::from_bhs(b)),
        Err(PduError::InvalidField { .. })
    ));
    // read without F
    let mut cmd = [0u8; 48];
    cmd[0] = 0x01;
    cmd[1] = 0x40 | 0x01;
    assert!(ScsiCommand::parse(&Pdu::from_bhs(cmd)).is_err());
    // reserved task attribute
    cmd[1] = 0x80 | 0x40 | 0x05;
    assert_eq!(
        ScsiCommand::parse(&Pdu::from_bhs(cmd))
            .unwrap_err()
            .reject_reason(),
        RejectReason::InvalidPduField
    );
    // truncated AHS
    cmd[1] = 0x80 | 0x40 | 0x01;
    let p = Pdu::new(cmd, Bytes::from_static(&[0, 40, 1, 0]), Bytes::new());
    assert!(matches!(ScsiCommand::parse(&p), Err(PduError::BadAhs(_))));
    // login with reserved CSG 2
    let mut l = [0u8; 48];
    l[0] = 0x43;
    l[1] = 2 << 2;
    assert!(LoginRequest::parse(&Pdu::from_bhs(l)).is_err());
    // T and C together
    l[1] = 0xc0 | 1;
    assert!(LoginRequest::parse(&Pdu::from_bhs(l)).is_err());
    // R2T with zero length / reserved TTT
    let mut r = [0u8; 48];
    r[0] = 0x31;
    r[1] = 0x80;
    assert!(R2t::parse(&Pdu::from_bhs(r)).is_err());
    // Data-In with S but not F
    let mut d = [0u8; 48];
    d[0] = 0x25;
    d[1] = 0x01;
    assert!(DataIn::parse(&Pdu::from_bhs(d)).is_err());
    // Reject without the header
    let mut j = [0u8; 48];
    j[0] = 0x3f;
    assert!(Reject::parse(&Pdu::from_bhs(j)).is_err());
    // undefined TMF function: answered with TMF response 5, so a distinct error
    let mut t = [0u8; 48];
    t[0] = 0x02;
    t[1] = 0x80 | 0x20;
    assert_eq!(
        TaskMgmtRequest::parse(&Pdu::from_bhs(t)),
        Err(PduError::UnknownTmfFunction(0x20))
    );
    // wrong opcode
    assert!(matches!(
        NopIn::parse(&Pdu::from_bhs(cmd)),
        Err(PduError::WrongOpcode { .. })
    ));
}
