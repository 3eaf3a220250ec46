//! Tests of the block LU through its public entry point, `execute`.

use std::sync::Arc;

use keyfence_scsi::sense::asc;
use keyfence_scsi::{InitiatorPort, Nexus, ScsiStatus, Sense, SenseKey, TargetPort};
use proptest::prelude::*;

use super::*;
use crate::backend::{FileBackend, MemBackend};

const TARGET: &str = "iqn.2026-11.io.keyfence:test";

fn port(tpgt: u16, rel: u16) -> TargetPort {
    TargetPort::new(TARGET, tpgt, rel)
}

fn nexus(name: &str) -> Nexus {
    Nexus::new(InitiatorPort::new(name, 0x23d0_0000_0001), port(1, 1))
}

fn config() -> LuConfig {
    let luns = Arc::new(TargetLuns::new(vec![0, 3, 300]));
    LuConfig::new(TARGET, 0, vec![port(1, 1), port(2, 2)], luns)
}

fn lu_with(backend: Arc<dyn BlockBackend>, cfg: LuConfig) -> LogicalUnit {
    LogicalUnit::new(cfg, backend).unwrap()
}

fn big_mem_lu() -> LogicalUnit {
    lu_with(Arc::new(MemBackend::new(64 << 20)), config())
}

fn mem_lu(blocks: u64) -> (LogicalUnit, Arc<MemBackend>) {
    let b = Arc::new(MemBackend::new(blocks * 512));
    (lu_with(b.clone(), config()), b)
}

/// Run a command; the first command of a nexus consumes POWER ON first.
fn run(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], out: &[u8]) -> CommandOutcome {
    lu.execute(&CommandRequest {
        nexus: n,
        cdb,
        data_out: out,
        read_only: false,
        luns: None,
    })
}

fn ready(lu: &LogicalUnit, n: &Nexus) {
    let o = run(lu, n, &[0; 6], &[]);
    assert_eq!(o.sense.unwrap().code(), crate::ua::NEW_NEXUS_UA);
    assert_eq!(run(lu, n, &[0; 6], &[]).status, ScsiStatus::Good);
}

fn good(o: &CommandOutcome) -> &[u8] {
    assert_eq!(o.status, ScsiStatus::Good, "sense {:?}", o.sense);
    &o.data_in
}

fn sense(o: &CommandOutcome) -> Sense {
    assert_eq!(o.status, ScsiStatus::CheckCondition);
    o.sense.unwrap()
}

fn rw16(op: u8, flags: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw10(op: u8, flags: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, a[0], a[1], 0]
}

#[test]
fn unit_attention_gate() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    // INQUIRY neither reports nor clears the unit attention.
    good(&run(&lu, &n, &inquiry(false, 0, 96), &[]));
    // REQUEST SENSE returns it as data and clears it.
    let rs = run(&lu, &n, &[0x03, 0, 0, 0, 252, 0], &[]);
    let s = Sense::parse(good(&rs)).unwrap();
    assert_eq!(s.key, SenseKey::UnitAttention);
    assert_eq!(s.code(), crate::ua::NEW_NEXUS_UA);
    good(&run(&lu, &n, &[0; 6], &[]));
    // Then REQUEST SENSE says NO SENSE; DESC=1 gives descriptor format.
    let rs = run(&lu, &n, &[0x03, 1, 0, 0, 252, 0], &[]);
    assert_eq!(&good(&rs)[..4], &[0x72, 0, 0, 0]);
    // Resets.
    lu.lu_reset();
    let s = sense(&run(&lu, &n, &[0; 6], &[]));
    assert_eq!(s.code(), asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
    lu.target_reset(false);
    let s = sense(&run(&lu, &n, &[0; 6], &[]));
    assert_eq!(s.code(), asc::POWER_ON_RESET_OR_BUS_DEVICE_RESET);
    lu.nexus_lost(&n);
    let s = sense(&run(&lu, &n, &[0; 6], &[]));
    assert_eq!(s.code(), asc::I_T_NEXUS_LOSS_OCCURRED);
    good(&run(&lu, &n, &[0; 6], &[]));
}

#[test]
fn read_write_roundtrip_and_ranges() {
    let (lu, b) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    good(&run(&lu, &n, &rw10(0x2a, 0, 10, 2), &data));
    assert_eq!(good(&run(&lu, &n, &rw16(0x88, 0, 10, 2), &[])), &data[..]);
    // READ(6)/READ(12).
    assert_eq!(
        good(&run(&lu, &n, &[0x08, 0, 0, 11, 1, 0], &[])),
        &data[512..]
    );
    let r12 = [0xa8, 0, 0, 0, 0, 10, 0, 0, 0, 1, 0, 0];
    assert_eq!(good(&run(&lu, &n, &r12, &[])), &data[..512]);
    // Zero blocks at the end is fine, past it is not.
    good(&run(&lu, &n, &rw10(0x28, 0, 64, 0), &[]));
    let s = sense(&run(&lu, &n, &rw10(0x28, 0, 65, 0), &[]));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
    let s = sense(&run(&lu, &n, &rw16(0x88, 0, 63, 2), &[]));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
    let s = sense(&run(&lu, &n, &rw16(0x88, 0, u64::MAX, 1), &[]));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
    // RDPROTECT without protection information.
    let s = sense(&run(&lu, &n, &rw10(0x28, 0x20, 0, 1), &[]));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(7)));
    // Less data-out than the transfer length (the transport saw a
    // shorter expected length): only the whole blocks received are written.
    good(&run(&lu, &n, &rw10(0x2a, 0, 20, 2), &[0xee; 512 + 100]));
    let o = run(&lu, &n, &rw10(0x28, 0, 20, 2), &[]);
    assert!(good(&o)[..512].iter().all(|&b| b == 0xee));
    assert!(good(&o)[512..].iter().all(|&b| b == 0));
    good(&run(&lu, &n, &rw10(0x2a, 0, 22, 2), &[]));
    // FUA reaches the backend's flush; a plain write does not.
    let before = b.flush_count();
    good(&run(&lu, &n, &rw10(0x2a, 0, 0, 1), &data[..512]));
    assert_eq!(b.flush_count(), before);
    good(&run(&lu, &n, &rw10(0x2a, 0x08, 0, 1), &data[..512]));
    assert_eq!(b.flush_count(), before + 1);
    // Over the maximum transfer length.
    let s = sense(&run(&lu, &n, &rw16(0x88, 0, 0, 1 << 20), &[]));
    assert_eq!(s, Sense::invalid_cdb_field(10, Some(7)));
}

#[test]
fn read_only_lu_refuses_writes() {
    let mut cfg = config();
    cfg.read_only = true;
    let lu = lu_with(Arc::new(MemBackend::new(64 * 512)), cfg);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    for cdb in [
        &rw10(0x2a, 0, 0, 1)[..],
        &rw16(0x93, 0x08, 0, 1)[..],
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0][..],
    ] {
        let s = sense(&run(&lu, &n, cdb, &[0; 512]));
        assert_eq!(
            (s.key, s.code()),
            (SenseKey::DataProtect, asc::WRITE_PROTECTED)
        );
    }
    good(&run(&lu, &n, &rw10(0x28, 0, 0, 1), &[]));
    // MODE SENSE reports WP.
    let ms = run(&lu, &n, &[0x1a, 0x08, 0x3f, 0, 255, 0], &[]);
    assert_eq!(good(&ms)[2] & 0x80, 0x80);
}

#[test]
fn standard_inquiry_and_vpd() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    let d = run(&lu, &n, &inquiry(false, 0, 255), &[]);
    let d = good(&d);
    assert_eq!(d.len(), 96);
    assert_eq!(&d[..8], &[0, 0, 6, 0x12, 91, 0x10, 0x10, 0x02]);
    assert_eq!(&d[8..16], b"KEYFENCE");
    assert_eq!(
        &d[58..66],
        &[0x00, 0xa0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xc0]
    );
    assert_eq!(good(&run(&lu, &n, &inquiry(false, 0, 5), &[])).len(), 5);
    // EVPD = 0 with a page code.
    let s = sense(&run(&lu, &n, &inquiry(false, 0x80, 255), &[]));
    assert_eq!(s, Sense::invalid_cdb_field(2, Some(7)));
    let s = sense(&run(&lu, &n, &inquiry(true, 0x99, 255), &[]));
    assert_eq!(s, Sense::invalid_cdb_field(2, Some(7)));
    let p0 = run(&lu, &n, &inquiry(true, 0, 255), &[]);
    assert_eq!(good(&p0)[4..], [0x00, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2]);
    // Every listed page is served with a consistent length.
    for &pg in &good(&p0)[4..] {
        let o = run(&lu, &n, &inquiry(true, pg, 1024), &[]);
        let d = good(&o);
        assert_eq!(d[1], pg);
        assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])) + 4, d.len());
    }
    let sn = run(&lu, &n, &inquiry(true, 0x80, 255), &[]);
    assert_eq!(&good(&sn)[4..], lu.config().serial.as_bytes());
    // Device identification: NAA, T10, relative port, TPG, names.
    let o = run(&lu, &n, &inquiry(true, 0x83, 1024), &[]);
    let descs = keyfence_scsi::vpd::decode_device_identification(good(&o)).unwrap();
    // The designators fill the page exactly.
    let used: usize = descs.iter().map(|d| 4 + d.value.len()).sum();
    assert_eq!(4 + used, good(&o).len());
    // (protocol identifier, code set, association, designator type)
    let kind = |d: &keyfence_scsi::vpd::Designator| {
        (
            d.protocol_identifier,
            d.code_set,
            d.association,
            d.designator_type,
        )
    };
    // NAA 6 (registered extended) for the logical unit, binary.
    assert_eq!(kind(&descs[0]), (None, 1, 0, 3));
    assert_eq!(descs[0].value[0] >> 4, 6);
    assert_eq!(&descs[0].value[..], &lu.config().naa[..]);
    // T10 vendor ID, ASCII.
    assert_eq!(kind(&descs[1]), (None, 2, 0, 1));
    assert!(descs[1].value.starts_with(b"KEYFENCE"));
    // Relative target port 1 and target port group 1, iSCSI (5), PIV set.
    assert_eq!(kind(&descs[2]), (Some(5), 1, 1, 4));
    assert_eq!(descs[2].relative_target_port(), Some(1));
    assert_eq!(descs[2].value, vec![0, 0, 0, 1]);
    assert_eq!(kind(&descs[3]), (Some(5), 1, 1, 5));
    assert_eq!(descs[3].value, vec![0, 0, 0, 1]);
    // SCSI name strings (UTF-8): the target port, then the target device.
    assert_eq!(kind(&descs[4]), (Some(5), 3, 1, 8));
    assert!(descs[4]
        .value
        .starts_with(b"iqn.2026-11.io.keyfence:test,t,0x0001\0"));
    assert_eq!(descs[4].value.len() % 4, 0);
    assert_eq!(kind(&descs[5]), (Some(5), 3, 2, 8));
    // Block limits and provisioning.
    let o = run(&lu, &n, &inquiry(true, 0xb0, 255), &[]);
    let bl = good(&o);
    assert_eq!(bl[5], 128);
    assert_eq!(u32::from_be_bytes(bl[8..12].try_into().unwrap()), 32768);
    assert_eq!(u32::from_be_bytes(bl[24..28].try_into().unwrap()), 256);
    // MAXIMUM UNMAP LBA COUNT 256 MiB worth; MAXIMUM WRITE SAME LENGTH no
    // more than a transfer.
    assert_eq!(u32::from_be_bytes(bl[20..24].try_into().unwrap()), 524288);
    assert_eq!(u64::from_be_bytes(bl[36..44].try_into().unwrap()), 32768);

    let o = run(&lu, &n, &inquiry(true, 0xb2, 255), &[]);
    assert_eq!(&good(&o)[4..8], &[0, 0xe4, 0x02, 0]);
    let o = run(&lu, &n, &inquiry(true, 0xb1, 255), &[]);
    assert_eq!(&good(&o)[4..6], &[0, 1]);
}

#[test]
fn naa_is_stable_and_distinct() {
    let a = derive_naa(TARGET, 0);
    assert_eq!(a, derive_naa(&TARGET.to_uppercase(), 0));
    assert_ne!(a, derive_naa(TARGET, 1));
    assert_eq!(a[0] >> 4, 6);
    assert_eq!(
        u32::from_be_bytes([a[0], a[1], a[2], a[3]]) >> 4 & 0xff_ffff,
        KEYFENCE_CID
    );
}

#[test]
fn capacity() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let o = run(&lu, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(good(&o), &[0, 0, 0, 63, 0, 0, 2, 0]);
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    let o = run(&lu, &n, &c, &[]);
    let d = good(&o);
    assert_eq!(d.len(), 32);
    assert_eq!(&d[..12], &[0, 0, 0, 0, 0, 0, 0, 63, 0, 0, 2, 0]);
    assert_eq!(d[13], 0);
    assert_eq!(d[14], 0xc0); // LBPME, LBPRZ
    c[13] = 8;
    assert_eq!(good(&run(&lu, &n, &c, &[])).len(), 8);
    // LBA without PMI.
    let s = sense(&run(&lu, &n, &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[]));
    assert_eq!(s, Sense::invalid_cdb_field(2, Some(7)));
}

#[test]
fn verify_and_write_and_verify() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let data = vec![0x5au8; 1024];
    good(&run(&lu, &n, &rw10(0x2a, 0, 4, 2), &data));
    good(&run(&lu, &n, &rw10(0x2f, 0x02, 4, 2), &data));
    let mut other = data.clone();
    other[700] = 0;
    let s = sense(&run(&lu, &n, &rw10(0x2f, 0x02, 4, 2), &other));
    assert_eq!(
        (s.key, s.code()),
        (SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY)
    );
    assert_eq!(s.information, Some(700));
    // BYTCHK 0 checks only the medium.
    good(&run(&lu, &n, &rw10(0x2f, 0, 4, 2), &other));
    // BYTCHK 11b: one block against each.
    good(&run(&lu, &n, &rw10(0x2f, 0x06, 4, 2), &data[..512]));
    let s = sense(&run(&lu, &n, &rw10(0x2f, 0x06, 4, 2), &other[512..]));
    assert_eq!(s.information, Some(188));
    // BYTCHK 10b is reserved.
    let s = sense(&run(&lu, &n, &rw10(0x2f, 0x04, 4, 2), &[]));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(2)));
    good(&run(&lu, &n, &rw16(0x8e, 0x02, 8, 2), &other));
    assert_eq!(good(&run(&lu, &n, &rw10(0x28, 0, 8, 2), &[])), &other[..]);
    let s = sense(&run(&lu, &n, &rw10(0x2e, 0, 63, 2), &data));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
}

fn unmap_params(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    p[0..2].copy_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
    p[2..4].copy_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
    for (l, c) in descs {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

fn unmap_cdb(len: usize) -> [u8; 10] {
    let l = (len as u16).to_be_bytes();
    [0x42, 0, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

fn get_lba_status(lba: u64, alloc: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

fn lba_status(d: &[u8]) -> Vec<(u64, u32, u8)> {
    d[8..]
        .chunks(16)
        .map(|c| {
            (
                u64::from_be_bytes(c[..8].try_into().unwrap()),
                u32::from_be_bytes(c[8..12].try_into().unwrap()),
                c[12],
            )
        })
        .collect()
}

#[test]
fn unmap_and_get_lba_status_on_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lu.img");
    let fb = Arc::new(FileBackend::open(&path, Some(4 << 20), false).unwrap());
    let mut cfg = config();
    cfg.block_size = 4096;
    let lu = lu_with(fb, cfg);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    // 1024 blocks, all deallocated.
    let o = run(&lu, &n, &get_lba_status(0, 1024), &[]);
    assert_eq!(lba_status(good(&o)), vec![(0, 1024, 1)]);
    good(&run(&lu, &n, &rw10(0x2a, 0, 100, 4), &[0xaa; 4 * 4096]));
    let o = run(&lu, &n, &get_lba_status(0, 1024), &[]);
    assert_eq!(
        lba_status(good(&o)),
        vec![(0, 100, 1), (100, 4, 0), (104, 920, 1)]
    );
    // Room for one or two descriptors only.
    let o = run(&lu, &n, &get_lba_status(0, 24), &[]);
    assert_eq!(lba_status(good(&o)), vec![(0, 100, 1)]);
    let o = run(&lu, &n, &get_lba_status(0, 40), &[]);
    assert_eq!(lba_status(good(&o)), vec![(0, 100, 1), (100, 4, 0)]);
    // PARAMETER DATA LENGTH tells the whole length even when cut short.
    let o = run(&lu, &n, &get_lba_status(0, 12), &[]);
    assert_eq!(&good(&o)[..4], &[0, 0, 0, 20]);
    // The first descriptor starts at the requested LBA.
    let o = run(&lu, &n, &get_lba_status(101, 24), &[]);
    assert_eq!(lba_status(good(&o)), vec![(101, 3, 0)]);
    let s = sense(&run(&lu, &n, &get_lba_status(1024, 24), &[]));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
    // UNMAP two blocks in the middle: they read back as zeroes.
    let p = unmap_params(&[(101, 2)]);
    good(&run(&lu, &n, &unmap_cdb(p.len()), &p));
    let o = run(&lu, &n, &get_lba_status(0, 1024), &[]);
    assert_eq!(
        lba_status(good(&o)),
        vec![
            (0, 100, 1),
            (100, 1, 0),
            (101, 2, 1),
            (103, 1, 0),
            (104, 920, 1)
        ]
    );
    let o = run(&lu, &n, &rw10(0x28, 0, 101, 2), &[]);
    assert!(good(&o).iter().all(|&b| b == 0));
    // WRITE SAME(16) with UNMAP deallocates too.
    let o = run(&lu, &n, &rw16(0x93, 0x08, 100, 4), &[0; 4096]);
    good(&o);
    let o = run(&lu, &n, &get_lba_status(0, 1024), &[]);
    assert_eq!(lba_status(good(&o)), vec![(0, 1024, 1)]);
}

#[test]
fn unmap_parameter_list_errors() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    // Zero length: nothing to do.
    good(&run(&lu, &n, &unmap_cdb(0), &[]));
    // Shorter than the header.
    let s = sense(&run(&lu, &n, &unmap_cdb(4), &[0; 4]));
    assert_eq!(s.code(), asc::PARAMETER_LIST_LENGTH_ERROR);
    // Block descriptor data length beyond the list.
    let mut p = unmap_params(&[(0, 1)]);
    p[3] = 32;
    let s = sense(&run(&lu, &n, &unmap_cdb(p.len()), &p));
    assert_eq!(s.code(), asc::PARAMETER_LIST_LENGTH_ERROR);
    // Out of range descriptor.
    let p = unmap_params(&[(0, 1), (60, 5)]);
    let s = sense(&run(&lu, &n, &unmap_cdb(p.len()), &p));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
    // Too many descriptors.
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i % 64, 0)).collect();
    let p = unmap_params(&many);
    let s = sense(&run(&lu, &n, &unmap_cdb(p.len()), &p));
    assert_eq!(s, Sense::invalid_param_field(2, None));
    // ANCHOR.
    let s = sense(&run(&lu, &n, &[0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0], &[]));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(0)));
}

#[test]
fn write_same_variants() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let blk = [0x11u8; 512];
    good(&run(&lu, &n, &rw10(0x41, 0, 2, 3), &blk));
    let o = run(&lu, &n, &rw10(0x28, 0, 1, 5), &[]);
    let d = good(&o);
    assert!(d[..512].iter().all(|&b| b == 0));
    assert!(d[512..2048].iter().all(|&b| b == 0x11));
    assert!(d[2048..].iter().all(|&b| b == 0));
    // Zero blocks: through the end of the medium.
    good(&run(&lu, &n, &rw10(0x41, 0, 60, 0), &blk));
    let o = run(&lu, &n, &rw10(0x28, 0, 60, 4), &[]);
    assert!(good(&o).iter().all(|&b| b == 0x11));
    let s = sense(&run(&lu, &n, &rw10(0x41, 0, 65, 0), &blk));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
    // NDOB writes zeroes without data-out.
    good(&run(&lu, &n, &rw16(0x93, 0x01, 2, 3), &[]));
    let o = run(&lu, &n, &rw10(0x28, 0, 2, 3), &[]);
    assert!(good(&o).iter().all(|&b| b == 0));
    // ANCHOR is not supported; wrong data-out size is refused.
    let s = sense(&run(&lu, &n, &rw10(0x41, 0x18, 0, 1), &blk));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(4)));
    let s = sense(&run(&lu, &n, &rw10(0x41, 0, 0, 1), &[0; 1024]));
    assert_eq!(s.key, SenseKey::IllegalRequest);
    let s = sense(&run(&lu, &n, &rw10(0x41, 0x20, 0, 1), &blk));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(7)));
}

fn caw(lba: u64, blocks: u8, fua: bool) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[1] = if fua { 0x08 } else { 0 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

#[test]
fn compare_and_write() {
    let (lu, b) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let mut buf = vec![0u8; 1024];
    buf[512..].fill(7);
    good(&run(&lu, &n, &caw(3, 1, false), &buf));
    assert_eq!(good(&run(&lu, &n, &rw10(0x28, 0, 3, 1), &[])), &buf[512..]);
    // The medium now holds 7s, so comparing with zeroes fails at byte 0.
    let s = sense(&run(&lu, &n, &caw(3, 1, false), &buf));
    assert_eq!((s.key, s.information), (SenseKey::Miscompare, Some(0)));
    let mut cmp = vec![7u8; 1024];
    cmp[100] = 1;
    let s = sense(&run(&lu, &n, &caw(3, 1, false), &cmp));
    assert_eq!(s.information, Some(100));
    // FUA reaches flush.
    let before = b.flush_count();
    let mut ok = vec![7u8; 1024];
    ok[512..].fill(9);
    good(&run(&lu, &n, &caw(3, 1, true), &ok));
    assert_eq!(b.flush_count(), before + 1);
    // Wrong data-out size (also with zero blocks), range.
    let s = sense(&run(&lu, &n, &caw(3, 1, false), &ok[..512]));
    assert_eq!(s, Sense::invalid_cdb_field(13, Some(7)));
    let s = sense(&run(&lu, &n, &caw(3, 0, false), &ok));
    assert_eq!(s, Sense::invalid_cdb_field(13, Some(7)));
    good(&run(&lu, &n, &caw(3, 0, false), &[]));
    let s = sense(&run(&lu, &n, &caw(64, 1, false), &ok));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
}

#[test]
fn write_same_limit() {
    let lu = big_mem_lu();
    let n = nexus("iqn.a");
    ready(&lu, &n);
    // Over MAXIMUM WRITE SAME LENGTH: refused at the length field, also
    // when NUMBER OF LOGICAL BLOCKS 0 means "to the end".
    let s = sense(&run(&lu, &n, &rw16(0x93, 0x08, 0, 32769), &[0; 512]));
    assert_eq!(s, Sense::invalid_cdb_field(10, Some(7)));
    let s = sense(&run(&lu, &n, &rw10(0x41, 0, 0, 0), &[0; 512]));
    assert_eq!(s, Sense::invalid_cdb_field(7, Some(7)));
    good(&run(&lu, &n, &rw16(0x93, 0, 0, 32768), &[1; 512]));
    let o = run(&lu, &n, &rw16(0x88, 0, 32767, 2), &[]);
    assert!(good(&o)[..512].iter().all(|&b| b == 1));
    assert!(good(&o)[512..].iter().all(|&b| b == 0));
}

#[test]
fn compare_and_write_is_atomic_against_other_writers() {
    // Many threads increment a counter block with COMPARE AND WRITE while
    // others write elsewhere in the same lock stripe; every successful
    // compare must correspond to exactly one increment.
    let (lu, _) = mem_lu(4096);
    let lu = Arc::new(lu);
    let threads = 4;
    let per = 200;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let lu = lu.clone();
            std::thread::spawn(move || {
                let n = nexus(&format!("iqn.t{t}"));
                run(&lu, &n, &[0; 6], &[]);
                let mut wins = 0u64;
                let mut tries = 0;
                while wins < per && tries < 100_000 {
                    tries += 1;
                    let cur = run(&lu, &n, &rw10(0x28, 0, 0, 1), &[]);
                    let cur = cur.data_in.to_vec();
                    let v = u64::from_be_bytes(cur[..8].try_into().unwrap());
                    let mut buf = cur.clone();
                    buf.extend_from_slice(&cur);
                    buf[512..520].copy_from_slice(&(v + 1).to_be_bytes());
                    let o = run(&lu, &n, &caw(0, 1, false), &buf);
                    match o.status {
                        ScsiStatus::Good => wins += 1,
                        _ => assert_eq!(o.sense.unwrap().key, SenseKey::Miscompare),
                    }
                    // Interleave plain writes in the same region.
                    run(&lu, &n, &rw10(0x2a, 0, 1 + t as u32, 1), &[t as u8; 512]);
                }
                wins
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(total, threads as u64 * per);
    let n = nexus("iqn.check");
    run(&lu, &n, &[0; 6], &[]);
    let o = run(&lu, &n, &rw10(0x28, 0, 0, 1), &[]);
    assert_eq!(
        u64::from_be_bytes(o.data_in[..8].try_into().unwrap()),
        total
    );
}

#[test]
fn orwrite_prefetch_sync() {
    let (lu, b) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    good(&run(&lu, &n, &rw10(0x2a, 0, 0, 1), &[0x0f; 512]));
    good(&run(&lu, &n, &rw16(0x8b, 0, 0, 1), &[0xf0; 512]));
    assert!(good(&run(&lu, &n, &rw10(0x28, 0, 0, 1), &[]))
        .iter()
        .all(|&x| x == 0xff));
    let s = sense(&run(&lu, &n, &rw16(0x8b, 0, 64, 1), &[0; 512]));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
    // Memory backend has no cache: GOOD rather than CONDITION MET.
    good(&run(&lu, &n, &rw10(0x34, 0, 0, 8), &[]));
    let s = sense(&run(&lu, &n, &rw16(0x90, 0, 60, 8), &[]));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
    let before = b.flush_count();
    good(&run(&lu, &n, &rw10(0x35, 0, 0, 0), &[]));
    good(&run(&lu, &n, &rw16(0x91, 0x02, 0, 64), &[]));
    assert_eq!(b.flush_count(), before + 2);
    let s = sense(&run(&lu, &n, &rw16(0x91, 0, 0, 65), &[]));
    assert_eq!(s.code(), asc::LBA_OUT_OF_RANGE);
}

#[test]
fn prefetch_on_file_is_condition_met() {
    let dir = tempfile::tempdir().unwrap();
    let fb = Arc::new(FileBackend::open(&dir.path().join("x"), Some(1 << 20), false).unwrap());
    let lu = lu_with(fb, config());
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let o = run(&lu, &n, &rw10(0x34, 0, 0, 8), &[]);
    assert_eq!(o.status, ScsiStatus::ConditionMet);
}

fn mode_select10(params: &[u8]) -> [u8; 10] {
    let l = (params.len() as u16).to_be_bytes();
    [0x55, 0x10, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

#[test]
fn mode_sense_and_select() {
    let (lu, b) = mem_lu(64);
    let n = nexus("iqn.a");
    let other = nexus("iqn.b");
    ready(&lu, &n);
    ready(&lu, &other);
    // MODE SENSE(6), all pages, with block descriptor.
    let o = run(&lu, &n, &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    let d = good(&o);
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(d[2], 0x10); // DPOFUA
    assert_eq!(d[3], 8);
    assert_eq!(&d[4..12], &[0, 0, 0, 64, 0, 0, 2, 0]);
    assert_eq!(&d[12..14], &[0x08, 18]);
    assert_eq!(d[14], 0x04); // WCE
    assert_eq!(&d[32..34], &[0x0a, 10]);
    assert_eq!(d.len(), 44);
    // DBD, single page, truncation.
    let o = run(&lu, &n, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]);
    assert_eq!(good(&o).len(), 4 + 12);
    assert_eq!(good(&run(&lu, &n, &[0x1a, 0, 0x3f, 0, 4, 0], &[])).len(), 4);
    // Saved values are not supported; unknown page and subpage.
    let s = sense(&run(&lu, &n, &[0x1a, 0, 0xc8, 0, 255, 0], &[]));
    assert_eq!(s.code(), asc::SAVING_PARAMETERS_NOT_SUPPORTED);
    let s = sense(&run(&lu, &n, &[0x1a, 0, 0x19, 0, 255, 0], &[]));
    assert_eq!(s, Sense::invalid_cdb_field(2, Some(5)));
    let s = sense(&run(&lu, &n, &[0x1a, 0, 0x08, 1, 255, 0], &[]));
    assert_eq!(s, Sense::invalid_cdb_field(3, Some(7)));
    // Changeable values.
    let o = run(&lu, &n, &[0x5a, 0x08, 0x48, 0, 0, 0, 0, 0, 255, 0], &[]);
    let d = good(&o);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
    assert_eq!(d[8 + 2], 0x04);
    // MODE SELECT(10): turn the write cache off.
    let o = run(&lu, &n, &[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0], &[]);
    let mut params = good(&o).to_vec();
    params[0] = 0;
    params[1] = 0;
    params[3] = 0;
    params[8 + 2] = 0;
    let flushes = b.flush_count();
    good(&run(&lu, &n, &mode_select10(&params), &params));
    assert_eq!(b.flush_count(), flushes + 1);
    // Writes are now durable at GOOD.
    good(&run(&lu, &n, &rw10(0x2a, 0, 0, 1), &[1; 512]));
    assert_eq!(b.flush_count(), flushes + 2);
    // The other nexus learns about it, the issuer does not.
    good(&run(&lu, &n, &[0; 6], &[]));
    let s = sense(&run(&lu, &other, &[0; 6], &[]));
    assert_eq!(s.code(), asc::MODE_PARAMETERS_CHANGED);
    // Changing a bit that is not changeable.
    let mut bad = params.clone();
    bad[8 + 2] |= 0x01; // RCD
    let s = sense(&run(&lu, &n, &mode_select10(&bad), &bad));
    assert_eq!(s, Sense::invalid_param_field(10, Some(0)));
    // SP, PF, short list.
    let mut c = mode_select10(&params);
    c[1] = 0x11;
    let s = sense(&run(&lu, &n, &c, &params));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(0)));
    c[1] = 0;
    let s = sense(&run(&lu, &n, &c, &params));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(4)));
    let s = sense(&run(&lu, &n, &mode_select10(&params[..5]), &params[..5]));
    assert_eq!(s.code(), asc::PARAMETER_LIST_LENGTH_ERROR);
    // SWP via the control page makes the LU write protected.
    let o = run(&lu, &n, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]);
    let mut p6 = good(&o).to_vec();
    p6[0] = 0;
    p6[2] = 0;
    p6[4 + 4] |= 0x08;
    good(&run(&lu, &n, &[0x15, 0x10, 0, 0, p6.len() as u8, 0], &p6));
    let s = sense(&run(&lu, &n, &rw10(0x2a, 0, 0, 1), &[1; 512]));
    assert_eq!(s.key, SenseKey::DataProtect);
    assert_eq!(lu.sense_bytes(&s)[0], 0x70);
    // D_SENSE: sense data switches to descriptor format.
    p6[4 + 2] |= 0x04;
    good(&run(&lu, &n, &[0x15, 0x10, 0, 0, p6.len() as u8, 0], &p6));
    let o = run(&lu, &n, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]);
    assert_eq!(good(&o)[4 + 2] & 0x04, 0x04);
    let s = sense(&run(&lu, &n, &rw10(0x2a, 0, 0, 1), &[1; 512]));
    let b = lu.sense_bytes(&s);
    assert_eq!(&b[..4], &[0x72, 0x07, 0x27, 0x00]);
    let rs = run(&lu, &n, &[0x03, 0, 0, 0, 252, 0], &[]);
    assert_eq!(good(&rs)[0], 0x72);
}

#[test]
fn report_luns_and_no_lu() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    let c = [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let o = run(&lu, &n, &c, &[]);
    let d = good(&o);
    assert_eq!(&d[..8], &[0, 0, 0, 24, 0, 0, 0, 0]);
    assert_eq!(&d[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&d[16..24], &[0, 3, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&d[24..32], &[0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
    // REPORT LUNS does not consume the pending unit attention.
    assert_eq!(lu.unit_attentions().peek(&n), Some(crate::ua::NEW_NEXUS_UA));
    // Well-known LUs only: none.
    let mut c1 = c;
    c1[2] = 1;
    assert_eq!(&good(&run(&lu, &n, &c1, &[]))[..4], &[0, 0, 0, 0]);
    let mut bad = c;
    bad[2] = 7;
    let s = sense(&run(&lu, &n, &bad, &[]));
    assert_eq!(s, Sense::invalid_cdb_field(2, Some(7)));
    // A LUN that does not exist.
    let luns = TargetLuns::new(vec![0]);
    let req = |cdb: &'static [u8]| CommandRequest {
        nexus: &n,
        cdb,
        data_out: &[],
        read_only: false,
        luns: None,
    };
    let o = execute_no_lu(&req(&[0x12, 0, 0, 0, 36, 0]), &luns);
    assert_eq!(good(&o)[0], 0x7f);
    let o = execute_no_lu(&req(&[0x00, 0, 0, 0, 0, 0]), &luns);
    assert_eq!(sense(&o).code(), asc::LOGICAL_UNIT_NOT_SUPPORTED);
    let o = execute_no_lu(&req(&[0x03, 0, 0, 0, 18, 0]), &luns);
    assert_eq!(
        Sense::parse(good(&o)).unwrap().code(),
        asc::LOGICAL_UNIT_NOT_SUPPORTED
    );
    let o = execute_no_lu(&req(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), &luns);
    assert_eq!(good(&o).len(), 16);
}

#[test]
fn a_read_only_view_protects_writes_and_sets_wp_for_that_nexus_only() {
    let (lu, b) = mem_lu(64);
    let (ro, rw) = (nexus("iqn.ro"), nexus("iqn.rw"));
    ready(&lu, &ro);
    ready(&lu, &rw);
    let view = TargetLuns::new(vec![5]);
    let byte = || {
        let mut x = [0u8; 1];
        b.read_at(&mut x, 512).unwrap();
        x[0]
    };
    let as_ro = |cdb: &[u8], out: &[u8]| {
        lu.execute(&CommandRequest {
            nexus: &ro,
            cdb,
            data_out: out,
            read_only: true,
            luns: Some(&view),
        })
    };
    let write10 = [0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0];
    let block = [0xabu8; 512];
    let s = sense(&as_ro(&write10, &block));
    assert_eq!(s.key, SenseKey::DataProtect);
    assert_eq!(s.code(), asc::WRITE_PROTECTED);
    assert_eq!(byte(), 0, "nothing was written");
    // WRITE SAME and UNMAP are writes too.
    let ws16 = [0x93, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0];
    assert_eq!(sense(&as_ro(&ws16, &block)).code(), asc::WRITE_PROTECTED);
    // MODE SENSE(6): WP in the device-specific parameter.
    let ms6 = [0x1a, 0, 0x3f, 0, 255, 0];
    assert_eq!(good(&as_ro(&ms6, &[]))[2] & 0x80, 0x80);
    assert_eq!(good(&run(&lu, &rw, &ms6, &[]))[2] & 0x80, 0);
    // Reads work; the other nexus writes.
    good(&as_ro(&[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], &[]));
    good(&run(&lu, &rw, &write10, &block));
    assert_eq!(byte(), 0xab);
    // REPORT LUNS lists the view, not the target's LUNs.
    let rl = [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let d = good(&as_ro(&rl, &[])).to_vec();
    assert_eq!(&d[..16], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0]);
    assert_eq!(good(&run(&lu, &rw, &rl, &[]))[3], 24);
}

fn rsoc(options: u8, rctd: bool, op: u8, sa: u16, alloc: u32) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0] = 0xa3;
    c[1] = 0x0c;
    c[2] = options | if rctd { 0x80 } else { 0 };
    c[3] = op;
    c[4..6].copy_from_slice(&sa.to_be_bytes());
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[test]
fn report_supported_operation_codes() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let o = run(&lu, &n, &rsoc(0, false, 0, 0, 65536), &[]);
    let d = good(&o);
    let len = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, d.len());
    assert_eq!(len, 8 * keyfence_scsi::opcode::COMMANDS.len());
    let o = run(&lu, &n, &rsoc(0, true, 0, 0, 65536), &[]);
    let d = good(&o);
    assert_eq!(d.len() - 4, 20 * keyfence_scsi::opcode::COMMANDS.len());
    assert_eq!(d[4 + 5] & 0x02, 0x02); // CTDP
    assert_eq!(&d[4 + 8..4 + 10], &[0, 0x0a]);
    // Every listed command is reported supported through the one-command
    // form, and its usage bitmap matches what parse accepts: setting every
    // usage bit except NACA is not refused for an invalid field outside
    // the bitmap.
    for c in keyfence_scsi::opcode::COMMANDS {
        let (opt, sa) = match c.service_action {
            Some(sa) => (2, u16::from(sa)),
            None => (1, 0),
        };
        let o = run(&lu, &n, &rsoc(opt, false, c.opcode, sa, 512), &[]);
        let d = good(&o);
        assert_eq!(d[1] & 0x07, 0x03, "{}", c.name);
        assert_eq!(&d[4..], c.usage, "{}", c.name);
        let mut cdb = c.usage.to_vec();
        let last = cdb.len() - 1;
        cdb[last] &= !0x04;
        if let Err(s) = keyfence_scsi::cdb::parse(&cdb) {
            assert!(
                s.code() != asc::INVALID_FIELD_IN_CDB
                    || s.field
                        .map(|f| c.usage[f.byte as usize] != 0)
                        .unwrap_or(true),
                "{}: {s:?}",
                c.name
            );
        }
        // One bit outside the bitmap is refused at that bit.
        let effective = |i: usize| {
            if i == 1 && c.service_action.is_some() {
                c.usage[1] | 0x1f
            } else {
                c.usage[i]
            }
        };
        if let Some((i, m)) = (1..last)
            .map(|i| (i, effective(i)))
            .find(|(_, m)| *m != 0xff)
        {
            let mut cdb = vec![0u8; c.usage.len()];
            cdb[0] = c.opcode;
            if let Some(sa) = c.service_action {
                cdb[1] = sa;
            }
            let bit = (!m).trailing_zeros() as u8;
            cdb[i] |= 1 << bit;
            if !matches!(c.opcode, 0x16 | 0x17 | 0x56 | 0x57 | 0x5e | 0x5f) {
                assert_eq!(
                    keyfence_scsi::cdb::parse(&cdb),
                    Err(Sense::invalid_cdb_field(i as u16, Some(bit))),
                    "{}",
                    c.name
                );
            }
        }
    }
    // Unsupported command: SUPPORT 001b.
    let o = run(&lu, &n, &rsoc(1, false, 0xc5, 0, 512), &[]);
    assert_eq!(good(&o), &[0, 1, 0, 0]);
    // Service action mismatch errors.
    let s = sense(&run(&lu, &n, &rsoc(1, false, 0x9e, 0, 512), &[]));
    assert_eq!(s, Sense::invalid_cdb_field(2, Some(2)));
    let s = sense(&run(&lu, &n, &rsoc(2, false, 0x28, 0, 512), &[]));
    assert_eq!(s, Sense::invalid_cdb_field(2, Some(2)));
    // RCTD in the one-command form.
    let o = run(&lu, &n, &rsoc(1, true, 0x35, 0, 512), &[]);
    let d = good(&o);
    assert_eq!(d[1], 0x83);
    assert_eq!(d.len(), 4 + 10 + 12);
}

#[test]
fn report_target_port_groups() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let o = run(&lu, &n, &[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0], &[]);
    let d = good(&o);
    assert_eq!(&d[..4], &[0, 0, 0, 24]);
    assert_eq!(&d[4..16], &[0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]);
    assert_eq!(&d[16..28], &[0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]);
    let o = run(&lu, &n, &[0xa3, 0x2a, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0], &[]);
    let d = good(&o);
    assert_eq!(&d[..8], &[0, 0, 0, 28, 0x10, 0, 0, 0]);
    let s = sense(&run(
        &lu,
        &n,
        &[0xa3, 0x4a, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0],
        &[],
    ));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(7)));
}

#[test]
fn misc_commands() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    good(&run(&lu, &n, &[0x1b, 0, 0, 0, 0x01, 0], &[]));
    good(&run(&lu, &n, &[0x1b, 1, 0, 0, 0x00, 0], &[]));
    let s = sense(&run(&lu, &n, &[0x1b, 0, 0, 0, 0x02, 0], &[]));
    assert_eq!(s, Sense::invalid_cdb_field(4, Some(1)));
    let s = sense(&run(&lu, &n, &[0x1b, 0, 0, 0, 0x40, 0], &[]));
    assert_eq!(s, Sense::invalid_cdb_field(4, Some(7)));
    good(&run(&lu, &n, &[0x1e, 0, 0, 0, 1, 0], &[]));
    good(&run(&lu, &n, &[0x1e, 0, 0, 0, 0, 0], &[]));
    let o = run(&lu, &n, &[0x37, 0, 0x1d, 0, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(good(&o), &[0, 0x1d, 0, 0]);
    let o = run(&lu, &n, &[0xb7, 0x0d, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(good(&o), &[0, 0x0d, 0, 0, 0, 0, 0, 0]);
    let s = sense(&run(&lu, &n, &[0xc0, 0, 0, 0, 0, 0], &[]));
    assert_eq!(s.code(), asc::INVALID_COMMAND_OPERATION_CODE);
    // SEND DIAGNOSTIC: the default self-test, and nothing else.
    good(&run(&lu, &n, &[0x1d, 0x04, 0, 0, 0, 0], &[]));
    good(&run(&lu, &n, &[0x1d, 0x00, 0, 0, 0, 0], &[]));
    let s = sense(&run(&lu, &n, &[0x1d, 0x24, 0, 0, 0, 0], &[]));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(7)));
    let s = sense(&run(&lu, &n, &[0x1d, 0x20, 0, 0, 0, 0], &[]));
    assert_eq!(s, Sense::invalid_cdb_field(1, Some(7)));
    let s = sense(&run(&lu, &n, &[0x1d, 0x10, 0, 0, 4, 0], &[0x80, 0, 0, 0]));
    assert_eq!(s, Sense::invalid_param_field(0, None));
    // NACA is refused.
    let s = sense(&run(&lu, &n, &[0, 0, 0, 0, 0, 0x04], &[]));
    assert_eq!(s, Sense::invalid_cdb_field(5, Some(2)));
}

#[test]
fn logical_unit_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<LogicalUnit>();
    assert_send_sync::<CommandOutcome>();
}

#[test]
fn config_validation() {
    let b: Arc<dyn BlockBackend> = Arc::new(MemBackend::new(1000));
    assert!(matches!(
        LogicalUnit::new(config(), b),
        Err(LuError::Unaligned { .. })
    ));
    let mut c = config();
    c.block_size = 1024;
    let b: Arc<dyn BlockBackend> = Arc::new(MemBackend::new(4096));
    assert!(matches!(
        LogicalUnit::new(c, b.clone()),
        Err(LuError::BlockSize(1024))
    ));
    let mut c = config();
    c.vendor = "TOO LONG VENDOR".into();
    assert!(matches!(
        LogicalUnit::new(c, b.clone()),
        Err(LuError::TooLong { .. })
    ));
    let mut c = config();
    c.target_ports.clear();
    assert!(matches!(LogicalUnit::new(c, b), Err(LuError::NoTargetPort)));
}

#[test]
fn blocking_hints_and_data_out_len() {
    let (lu, _) = mem_lu(64);
    assert!(lu.is_blocking(&rw10(0x35, 0, 0, 0)));
    assert!(lu.is_blocking(&rw10(0x2a, 0x08, 0, 1)));
    assert!(!lu.is_blocking(&rw10(0x2a, 0, 0, 1)));
    assert!(!lu.is_blocking(&rw10(0x28, 0, 0, 1)));
    assert!(lu.is_blocking(&unmap_cdb(24)));
    assert_eq!(lu.data_out_len(&rw10(0x2a, 0, 0, 3)), Some(1536));
    assert_eq!(lu.data_out_len(&rw10(0x28, 0, 0, 3)), Some(0));
    assert_eq!(lu.data_out_len(&[0xc0; 16]), None);
    // Exact data-out for COMPARE AND WRITE and WRITE SAME only.
    assert!(lu.check_data_out_length(&caw(0, 2, false), 2048).is_ok());
    assert_eq!(
        lu.check_data_out_length(&caw(0, 0, false), 262144),
        Err(Sense::invalid_cdb_field(13, Some(7)))
    );
    assert!(lu
        .check_data_out_length(&rw16(0x93, 0, 0, 8), 1024)
        .is_err());
    assert!(lu.check_data_out_length(&rw16(0x93, 1, 0, 8), 0).is_ok());
    assert!(lu.check_data_out_length(&rw10(0x2a, 0, 0, 2), 512).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_cdbs_never_panic(
        op in prop::sample::select(
            keyfence_scsi::opcode::COMMANDS.iter().map(|c| c.opcode).chain([0xc0u8, 0x7f, 0xff]).collect::<Vec<u8>>()
        ),
        rest in prop::collection::vec(any::<u8>(), 0..16),
        data in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let (lu, _) = mem_lu(16);
        let n = nexus("iqn.p");
        run(&lu, &n, &[0; 6], &[]);
        let mut cdb = vec![op];
        cdb.extend_from_slice(&rest);
        // The transport-facing helpers never panic either.
        let _ = lu.data_out_len(&cdb);
        let _ = lu.is_blocking(&cdb);
        let _ = lu.check_data_out_length(&cdb, data.len() as u64);
        let _ = execute_no_lu(&CommandRequest { nexus: &n, cdb: &cdb, data_out: &data, read_only: false, luns: None }, &TargetLuns::new(vec![0]));
        let o = run(&lu, &n, &cdb, &data);
        if o.status == ScsiStatus::CheckCondition {
            prop_assert!(o.sense.is_some());
        }
        // Nothing returned exceeds what any allocation length allows.
        prop_assert!(o.data_in.len() <= 16 * 512 + 65536);
    }

    #[test]
    fn random_unmap_and_mode_select_lists_never_panic(
        ms in any::<bool>(),
        data in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let (lu, _) = mem_lu(16);
        let n = nexus("iqn.p");
        run(&lu, &n, &[0; 6], &[]);
        let cdb = match (ms, data.len() % 2) {
            (true, 0) => mode_select10(&data).to_vec(),
            (true, _) => vec![0x15, 0x10, 0, 0, data.len().min(255) as u8, 0],
            _ => unmap_cdb(data.len()).to_vec(),
        };
        let o = run(&lu, &n, &cdb, &data);
        prop_assert!(o.status == ScsiStatus::Good || o.status == ScsiStatus::CheckCondition);
    }
}

#[test]
fn write_and_verify_underflow_writes_received_blocks() {
    let (lu, _) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    good(&run(&lu, &n, &rw10(0x2a, 0, 0, 2), &[b'a'; 1024]));
    good(&run(&lu, &n, &rw10(0x2e, 0, 0, 2), &[b'b'; 512]));
    let o = run(&lu, &n, &rw10(0x28, 0, 0, 2), &[]);
    assert!(good(&o)[..512].iter().all(|&b| b == b'b'));
    assert!(good(&o)[512..].iter().all(|&b| b == b'a'));
    good(&run(&lu, &n, &rw10(0x2e, 0x02, 0, 1), &[]));
}

/// A shared PR state that commits nothing it is not asked to: enough to
/// build a clustered LU and see what it offers.
#[derive(Debug)]
struct OneGatewayShared(std::sync::Mutex<keyfence_pr::PrState>);

impl reservation::SharedPrState for OneGatewayShared {
    fn may_serve(&self) -> bool {
        true
    }
    fn commit(
        &self,
        mut change: reservation::SharedChange,
    ) -> Result<keyfence_pr::PrState, keyfence_pr::Refusal> {
        let mut st = self.0.lock().unwrap();
        let a = change(&st)?;
        *st = a.state.clone();
        Ok(a.state)
    }
    fn commit_detached(&self, change: reservation::SharedChange) {
        let _ = self.commit(change);
    }
}

#[test]
fn a_clustered_lu_neither_offers_nor_runs_compare_and_write() {
    let mut cfg = config();
    cfg.shared_pr = Some(Arc::new(OneGatewayShared(Default::default())));
    let lu = lu_with(Arc::new(MemBackend::new(1 << 20)), cfg);
    let n = nexus("iqn.caw");
    lu.reservations().install(keyfence_pr::PrState::default());
    ready(&lu, &n);
    let mut caw = [0u8; 16];
    caw[0] = 0x89;
    caw[13] = 1;
    let o = run(&lu, &n, &caw, &[0u8; 1024]);
    assert_eq!(sense(&o).code(), asc::INVALID_COMMAND_OPERATION_CODE);
    // REPORT SUPPORTED OPERATION CODES: one command, 89h: not supported.
    let rsoc = [0xa3, 0x0c, 0x01, 0x89, 0, 0, 0, 0, 1, 0, 0, 0];
    assert_eq!(good(&run(&lu, &n, &rsoc, &[]))[1] & 0x07, 0x01);
    // ... and absent from the full list.
    let all = [0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    let list = good(&run(&lu, &n, &all, &[])).to_vec();
    assert!(!list[4..].chunks(8).any(|d| d[0] == 0x89));
    // Block Limits VPD: MAXIMUM COMPARE AND WRITE LENGTH 0.
    assert_eq!(good(&run(&lu, &n, &inquiry(true, 0xb0, 64), &[]))[5], 0);

    // A single-node LU offers it.
    let single = big_mem_lu();
    ready(&single, &n);
    assert_eq!(good(&run(&single, &n, &rsoc, &[]))[1] & 0x07, 0x03);
    assert!(good(&run(&single, &n, &inquiry(true, 0xb0, 64), &[]))[5] > 0);
}

/// A shared PR state whose gateway may serve for `calls` more checks, then
/// not (its serving deadline passes while a command is under way).
#[derive(Debug)]
struct ServingFor(std::sync::atomic::AtomicI64);

impl reservation::SharedPrState for ServingFor {
    fn may_serve(&self) -> bool {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0
    }
    fn commit(
        &self,
        _: reservation::SharedChange,
    ) -> Result<keyfence_pr::PrState, keyfence_pr::Refusal> {
        Err(keyfence_pr::Refusal::Conflict)
    }
    fn commit_detached(&self, _: reservation::SharedChange) {}
}

/// A write that passed the reservation check just before the gateway's
/// serving deadline is refused at submission (NOT READY, ASYMMETRIC
/// ACCESS STATE TRANSITION) and nothing reaches the medium; a long WRITE
/// SAME stops at the chunk where the deadline passed.
#[test]
fn a_clustered_lu_submits_nothing_after_the_serving_deadline() {
    let serving = Arc::new(ServingFor(std::sync::atomic::AtomicI64::new(i64::MAX)));
    let mut cfg = config();
    cfg.shared_pr = Some(serving.clone());
    let backend = Arc::new(MemBackend::new(8 << 20));
    let lu = lu_with(backend.clone(), cfg);
    lu.reservations().install(keyfence_pr::PrState::default());
    let n = nexus("iqn.deadline");
    ready(&lu, &n);
    let transition = |o: &CommandOutcome| {
        let s = sense(o);
        assert_eq!(
            (s.key, s.code()),
            (SenseKey::NotReady, asc::ASYMMETRIC_ACCESS_STATE_TRANSITION)
        );
    };
    let medium = |lba: u64, blocks: usize| {
        let mut b = vec![0u8; blocks * 512];
        backend.read_at(&mut b, lba * 512).unwrap();
        b
    };
    // WRITE(10): the check passes (one call), the submission does not.
    serving.0.store(1, std::sync::atomic::Ordering::SeqCst);
    transition(&run(&lu, &n, &rw10(0x2a, 0, 0, 2), &[0x5a; 1024]));
    assert_eq!(medium(0, 2), vec![0; 1024]);
    // WRITE SAME(16) over three 1 MiB chunks: the check and the first
    // chunk pass, the second chunk does not.
    let chunk = (sbc::OPTIMAL_TRANSFER_BYTES / 512) as u32;
    serving.0.store(2, std::sync::atomic::Ordering::SeqCst);
    transition(&run(&lu, &n, &rw16(0x93, 0, 16, 3 * chunk), &[0xa5; 512]));
    assert_eq!(medium(16, chunk as usize), vec![0xa5; chunk as usize * 512]);
    assert_eq!(
        medium(16 + u64::from(chunk), 2 * chunk as usize),
        vec![0; 2 * chunk as usize * 512]
    );
    // Serving again: the write goes through.
    serving
        .0
        .store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
    good(&run(&lu, &n, &rw10(0x2a, 0, 0, 2), &[0x5a; 1024]));
    assert_eq!(medium(0, 2), vec![0x5a; 1024]);
}

fn try_nowait(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], max: u64) -> Option<CommandOutcome> {
    lu.try_read_nowait(
        &CommandRequest {
            nexus: n,
            cdb,
            data_out: &[],
            read_only: false,
            luns: None,
        },
        max,
    )
}

#[test]
fn nowait_read_answers_from_the_page_cache_as_execute_would() {
    let dir = tempfile::tempdir().unwrap();
    let fb = Arc::new(FileBackend::open(&dir.path().join("x"), Some(1 << 20), false).unwrap());
    let lu = lu_with(fb, config());
    let n = nexus("iqn.a");
    // A unit attention is pending for a new nexus: left to `execute`,
    // which reports it, and not consumed.
    assert_eq!(try_nowait(&lu, &n, &rw10(0x28, 0, 0, 8), 1 << 20), None);
    ready(&lu, &n);
    let data: Vec<u8> = (0..8 * 512).map(|i| (i % 253) as u8).collect();
    good(&run(&lu, &n, &rw10(0x2a, 0, 16, 8), &data));
    // Cached: the same answer as `execute`, by READ(10) and READ(16).
    for cdb in [&rw10(0x28, 0, 16, 8)[..], &rw16(0x88, 0, 16, 8)[..]] {
        let o = try_nowait(&lu, &n, cdb, 1 << 20).expect("cached read");
        assert_eq!(good(&o), &data[..]);
        assert_eq!(o, run(&lu, &n, cdb, &[]));
    }
    // Not tried: FUA (read from the medium), larger than allowed, not a
    // READ.
    assert_eq!(try_nowait(&lu, &n, &rw10(0x28, 0x08, 16, 8), 1 << 20), None);
    assert_eq!(try_nowait(&lu, &n, &rw10(0x28, 0, 16, 8), 4095), None);
    assert_eq!(try_nowait(&lu, &n, &rw10(0x2a, 0, 16, 8), 1 << 20), None);
    assert_eq!(try_nowait(&lu, &n, &rw10(0x2f, 0, 16, 8), 1 << 20), None);
    // Checks that need no medium access are answered.
    let o = try_nowait(&lu, &n, &rw10(0x28, 0, 2047, 2), 1 << 20).unwrap();
    assert_eq!(sense(&o).code(), asc::LBA_OUT_OF_RANGE);
    let other = nexus("iqn.b");
    ready(&lu, &other);
    good(&run(&lu, &other, &[0x16, 0, 0, 0, 0, 0], &[]));
    let o = try_nowait(&lu, &n, &rw10(0x28, 0, 16, 8), 1 << 20).unwrap();
    assert_eq!(o.status, ScsiStatus::ReservationConflict);
    good(&run(&lu, &other, &[0x17, 0, 0, 0, 0, 0], &[]));
    // A unit attention queued later is left for `execute` too.
    lu.queue_unit_attention(UaScope::All, asc::MODE_PARAMETERS_CHANGED);
    assert_eq!(try_nowait(&lu, &n, &rw10(0x28, 0, 16, 8), 1 << 20), None);
    let s = sense(&run(&lu, &n, &rw10(0x28, 0, 16, 8), &[]));
    assert_eq!(s.code(), asc::MODE_PARAMETERS_CHANGED);
    assert!(try_nowait(&lu, &n, &rw10(0x28, 0, 16, 8), 1 << 20).is_some());
}

#[test]
fn nowait_read_on_a_backend_without_a_cache_would_block() {
    let (lu, b) = mem_lu(64);
    let n = nexus("iqn.a");
    ready(&lu, &n);
    b.write_at(&[7; 512], 0).unwrap();
    assert_eq!(try_nowait(&lu, &n, &rw10(0x28, 0, 0, 1), 1 << 20), None);
    assert_eq!(good(&run(&lu, &n, &rw10(0x28, 0, 0, 1), &[])), &[7; 512]);
}

/// A single-node LU over an uncached (direct = true) backing file: what
/// it acknowledges is on the file for any other reader at once, READs of
/// every length and LBA and the compare of COMPARE AND WRITE read through
/// the aligned bounce buffer, and READs are never tried from a cache.
#[test]
fn a_direct_lu_writes_through_to_the_file_and_reads_every_range() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("direct.img");
    let fb = FileBackend::open_direct(&path, Some(1 << 20), false).unwrap();
    // The smallest block size the file system's direct I/O allows.
    let bs = fb.direct_io().unwrap().offset.max(512) as u32;
    assert!(bs == 512 || bs == 4096, "direct I/O alignment {bs}");
    fb.check_alignment(bs).unwrap();
    let mut cfg = config();
    cfg.block_size = bs;
    let lu = lu_with(Arc::new(fb), cfg);
    let blocks = lu.block_count();
    let n = nexus("iqn.direct");
    ready(&lu, &n);
    let bsz = bs as usize;
    let pattern = |lba: u64, count: usize| -> Vec<u8> {
        (0..count * bsz)
            .map(|i| ((lba as usize * bsz + i) % 251) as u8)
            .collect()
    };
    let other = std::fs::File::open(&path).unwrap();
    let on_file = |lba: u64, count: usize| {
        let mut v = vec![0u8; count * bsz];
        other.read_exact_at(&mut v, lba * u64::from(bs)).unwrap();
        v
    };
    // Writes of one and of several blocks, at odd LBAs and the last one.
    for (lba, count) in [(1u64, 1u16), (3, 5), (blocks - 2, 2)] {
        let data = pattern(lba, count.into());
        good(&run(&lu, &n, &rw10(0x2a, 0, lba as u32, count), &data));
        assert_eq!(on_file(lba, count.into()), data, "WRITE at {lba}");
    }
    // Reads spanning written blocks and holes, at any LBA.
    let want = |lba: u64, count: usize| -> Vec<u8> {
        (lba..lba + count as u64)
            .flat_map(|b| {
                let written = b == 1 || (3..8).contains(&b) || b >= blocks - 2;
                if written {
                    pattern(b, 1)
                } else {
                    vec![0; bsz]
                }
            })
            .collect()
    };
    for (lba, count) in [
        (0u64, 1u32),
        (1, 1),
        (0, 9),
        (2, 3),
        (5, 1),
        (blocks - 3, 3),
    ] {
        let cdb = rw16(0x88, 0, lba, count);
        assert!(
            try_nowait(&lu, &n, &cdb, 1 << 20).is_none(),
            "nowait READ at {lba}"
        );
        assert_eq!(
            good(&run(&lu, &n, &cdb, &[])),
            &want(lba, count as usize)[..]
        );
    }
    // COMPARE AND WRITE compares against the medium and writes through.
    let mut buf = pattern(3, 1);
    buf.extend(vec![0x5a; bsz]);
    good(&run(&lu, &n, &caw(3, 1, false), &buf));
    assert_eq!(on_file(3, 1), vec![0x5a; bsz]);
    let s = sense(&run(&lu, &n, &caw(3, 1, false), &buf));
    assert_eq!(s.key, SenseKey::Miscompare);
    // Another writer of the file is seen at once: no cache in between.
    let rw = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    rw.write_all_at(&vec![0xc3; bsz], 9 * u64::from(bs))
        .unwrap();
    rw.sync_all().unwrap();
    assert_eq!(
        good(&run(&lu, &n, &rw10(0x28, 0, 9, 1), &[])),
        &vec![0xc3; bsz][..]
    );
    good(&run(&lu, &n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
}

/// A backend whose writes stop inside `write_at` until let go, to have a
/// write in flight at a chosen moment.
#[derive(Debug)]
struct GatedBackend {
    inner: MemBackend,
    open: std::sync::Mutex<bool>,
    turn: std::sync::Condvar,
    entered: std::sync::atomic::AtomicUsize,
}

impl GatedBackend {
    fn let_go(&self) {
        *self.open.lock().unwrap() = true;
        self.turn.notify_all();
    }
}

impl BlockBackend for GatedBackend {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.turn.wait(open).unwrap();
        }
        drop(open);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn mapped_ranges(
        &self,
        range: std::ops::Range<u64>,
        limit: usize,
    ) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        self.inner.mapped_ranges(range, limit)
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

/// A write of `blocks` blocks of `byte` at `lba` on another thread; its
/// outcome arrives on the channel.
fn write_on_thread(
    lu: &Arc<LogicalUnit>,
    n: &Nexus,
    lba: u64,
    blocks: u32,
    byte: u8,
) -> std::sync::mpsc::Receiver<CommandOutcome> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (lu, n) = (lu.clone(), n.clone());
    std::thread::spawn(move || {
        let data = vec![byte; blocks as usize * 512];
        let _ = tx.send(run(&lu, &n, &rw16(0x8a, 0, lba, blocks), &data));
    });
    rx
}

/// Ranges held for another gateway's COMPARE AND WRITE (cluster mode):
/// overlapping writes of every kind wait until the range is released,
/// others do not; holding everything holds every write.
#[test]
fn held_ranges_hold_overlapping_writes_until_released() {
    let lu = Arc::new(big_mem_lu());
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let none = std::time::Duration::from_millis(300);
    lu.hold_ranges(vec![HeldRange {
        id: 7,
        lba: 100,
        blocks: 8,
    }]);
    // Outside the range: at once.
    good(&run(&lu, &n, &rw16(0x8a, 0, 108, 1), &[1; 512]));
    good(&run(&lu, &n, &rw16(0x8a, 0, 92, 8), &[1; 4096]));
    // Inside: WRITE, and WRITE SAME, UNMAP and ORWRITE, wait.
    let w = write_on_thread(&lu, &n, 96, 8, 2);
    let mut ws = rw16(0x93, 0, 107, 2);
    ws[1] = 0;
    let same = {
        let (lu, n) = (lu.clone(), n.clone());
        std::thread::spawn(move || run(&lu, &n, &ws, &[3; 512]))
    };
    let unmap = {
        let (lu, n) = (lu.clone(), n.clone());
        std::thread::spawn(move || {
            let mut p = vec![0u8; 24];
            p[1] = 22;
            p[3] = 16;
            p[8..16].copy_from_slice(&100u64.to_be_bytes());
            p[16..20].copy_from_slice(&1u32.to_be_bytes());
            run(&lu, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p)
        })
    };
    let orw = {
        let (lu, n) = (lu.clone(), n.clone());
        std::thread::spawn(move || run(&lu, &n, &rw16(0x8b, 0, 105, 1), &[0x40; 512]))
    };
    assert!(
        w.recv_timeout(none).is_err(),
        "an overlapping WRITE went on"
    );
    for t in [&same, &unmap, &orw] {
        assert!(!t.is_finished(), "an overlapping command went on");
    }
    // The medium is untouched there.
    assert_eq!(good(&run(&lu, &n, &rw16(0x88, 0, 100, 8), &[])), &[0; 4096]);
    assert_eq!(
        lu.held_ranges(),
        (
            false,
            vec![HeldRange {
                id: 7,
                lba: 100,
                blocks: 8
            }]
        )
    );
    lu.hold_ranges(Vec::new());
    good(&w.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
    for t in [same, unmap, orw] {
        good(&t.join().unwrap());
    }
    // Everything held (not synchronised yet): any write waits.
    lu.hold_all_ranges();
    let w = write_on_thread(&lu, &n, 5000, 1, 4);
    assert!(
        w.recv_timeout(none).is_err(),
        "a WRITE went on while all is held"
    );
    lu.hold_ranges(vec![HeldRange {
        id: 9,
        lba: 0,
        blocks: 1,
    }]);
    good(&w.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
    lu.hold_ranges(Vec::new());
}

/// Holding a range waits for the writes to it already in flight (past the
/// check, inside the backend) and returns only once they finished; a
/// write in flight elsewhere is not waited for.
#[test]
fn holding_a_range_waits_for_the_writes_in_flight_there() {
    let b = Arc::new(GatedBackend {
        inner: MemBackend::new(64 << 20),
        open: std::sync::Mutex::new(false),
        turn: std::sync::Condvar::new(),
        entered: std::sync::atomic::AtomicUsize::new(0),
    });
    let lu = Arc::new(lu_with(b.clone(), config()));
    let n = nexus("iqn.a");
    ready(&lu, &n);
    let w = write_on_thread(&lu, &n, 100, 1, 5);
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while b.entered.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < give_up,
            "the write never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // A range in another stripe: held at once.
    let other = {
        let lu = lu.clone();
        std::thread::spawn(move || {
            lu.hold_ranges(vec![HeldRange {
                id: 1,
                lba: 4096,
                blocks: 4,
            }])
        })
    };
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !other.is_finished() {
        if std::time::Instant::now() >= give_up {
            // Let the write go so the test ends, then fail.
            b.let_go();
            panic!("a range elsewhere waited for the write in flight");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let holding = {
        let lu = lu.clone();
        std::thread::spawn(move || {
            lu.hold_ranges(vec![
                HeldRange {
                    id: 1,
                    lba: 4096,
                    blocks: 4,
                },
                HeldRange {
                    id: 2,
                    lba: 96,
                    blocks: 8,
                },
            ]);
            // What the medium holds once the range is held.
            let mut buf = vec![0u8; 512];
            lu.backend().read_at(&mut buf, 100 * 512).unwrap();
            buf
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !holding.is_finished(),
        "held before the write in flight ended"
    );
    b.let_go();
    assert_eq!(holding.join().unwrap(), vec![5u8; 512]);
    good(&w.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
    lu.hold_ranges(Vec::new());
}
