//! SPC-4 commands of the block LU: INQUIRY and its VPD pages, MODE SENSE
//! and MODE SELECT, REPORT LUNS, REPORT SUPPORTED OPERATION CODES, REPORT
//! TARGET PORT GROUPS, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, READ
//! DEFECT DATA, and sense data encoding.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use keyfence_scsi::cdb::{self, Cdb};
use keyfence_scsi::opcode::{self, CommandInfo, COMMANDS};
use keyfence_scsi::sense::asc;
use keyfence_scsi::vpd::{self, Association, CodeSet, DesignatorType};
use keyfence_scsi::{Sense, SenseKey};

use super::sbc::{
    MAX_COMPARE_AND_WRITE_BLOCKS, MAX_UNMAP_BYTES, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BYTES,
    OPTIMAL_TRANSFER_BYTES, UNMAP_GRANULARITY_BYTES,
};
use super::{CommandOutcome, CommandRequest, LogicalUnit, TargetLuns, UaScope};

/// Sense data in fixed (70h) or descriptor (72h) format.
pub(crate) fn encode_sense(s: &Sense, descriptor: bool) -> Vec<u8> {
    if !descriptor {
        return s.to_fixed().to_vec();
    }
    let mut b = vec![0x72, s.key as u8, s.asc, s.ascq, 0, 0, 0, 0];
    if let Some(info) = s.information {
        // Information descriptor, VALID set.
        b.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
        b.extend_from_slice(&u64::from(info).to_be_bytes());
    }
    if s.field.is_some() {
        // Sense key specific descriptor with the field pointer.
        let fixed = s.to_fixed();
        b.extend_from_slice(&[0x02, 0x06, 0, 0]);
        b.extend_from_slice(&fixed[15..18]);
        b.push(0);
    }
    b[7] = (b.len() - 8) as u8;
    b
}

fn cut(mut d: Vec<u8>, alloc_len: usize) -> CommandOutcome {
    d.truncate(alloc_len);
    CommandOutcome::data(Bytes::from(d))
}

/// SAM-5 LUN encoding: peripheral device addressing below 256, flat space
/// addressing up to 16383.
pub(crate) fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) & 0x3f) as u8;
        b[1] = lun as u8;
    }
    b
}

fn report_luns(select_report: u8, alloc_len: u32, luns: &TargetLuns) -> CommandOutcome {
    // keyfence has no well-known or administrative logical units.
    let list = match select_report {
        0x00 | 0x02 | 0x11 => luns.get(),
        _ => Default::default(),
    };
    let mut d = Vec::with_capacity(8 + 8 * list.len());
    d.extend_from_slice(&((8 * list.len()) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for &l in list.iter() {
        d.extend_from_slice(&encode_lun(l));
    }
    cut(d, alloc_len as usize)
}

/// Answer a command for a LUN the target does not have.
pub(crate) fn no_lu(req: &CommandRequest<'_>, luns: &TargetLuns) -> CommandOutcome {
    let not_supported = Sense::illegal_request(asc::LOGICAL_UNIT_NOT_SUPPORTED);
    match cdb::parse(req.cdb) {
        Ok(Cdb::Inquiry {
            evpd,
            page,
            alloc_len,
        }) => {
            // Peripheral qualifier 011b, device type 1Fh: no LU here.
            let d = if evpd {
                vec![0x7f, page, 0, 0]
            } else {
                let mut d = vec![0x7f, 0, 0x06, 0x12, 31, 0, 0, 0x02];
                d.resize(36, b' ');
                d
            };
            cut(d, alloc_len.into())
        }
        Ok(Cdb::ReportLuns {
            select_report,
            alloc_len,
        }) => report_luns(select_report, alloc_len, luns),
        Ok(Cdb::RequestSense { desc, alloc_len }) => {
            cut(encode_sense(&not_supported, desc), alloc_len.into())
        }
        _ => CommandOutcome::check_condition(not_supported),
    }
}

/// Mode page control values.
const PC_CURRENT: u8 = 0;
const PC_CHANGEABLE: u8 = 1;
const PC_DEFAULT: u8 = 2;

const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0a;
const ALL_PAGES: u8 = 0x3f;
/// Pages in page-code order.
const MODE_PAGES: [u8; 2] = [PAGE_CACHING, PAGE_CONTROL];

impl LogicalUnit {
    pub(super) fn dispatch_spc(
        &self,
        req: &CommandRequest<'_>,
        c: Cdb,
    ) -> Result<CommandOutcome, Sense> {
        match c {
            Cdb::TestUnitReady => Ok(CommandOutcome::good()),
            Cdb::Inquiry {
                evpd,
                page,
                alloc_len,
            } => {
                let d = if evpd {
                    self.vpd_page(req, page)?
                } else {
                    self.standard_inquiry()
                };
                Ok(cut(d, alloc_len.into()))
            }
            Cdb::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc_len,
            } => self.mode_sense(req, ten, dbd, llbaa, pc, page, subpage, alloc_len),
            Cdb::ModeSelect {
                ten,
                pf,
                sp,
                param_len,
            } => self.mode_select(req, ten, pf, sp, param_len),
            Cdb::StartStopUnit {
                power_condition,
                no_flush,
                loej,
                start,
                ..
            } => {
                if loej {
                    // Not removable: there is nothing to load or eject.
                    return Err(Sense::invalid_cdb_field(4, Some(1)));
                }
                match power_condition {
                    // START_VALID, ACTIVE, IDLE, STANDBY, LU_CONTROL,
                    // FORCE_IDLE_0, FORCE_STANDBY_0: no power management,
                    // all accepted as no-ops.
                    0x0 | 0x1 | 0x2 | 0x3 | 0x7 | 0xa | 0xb => {}
                    _ => return Err(Sense::invalid_cdb_field(4, Some(7))),
                }
                if power_condition == 0 && !start && !no_flush {
                    // Stopping: write the cache to the medium first.
                    self.backend
                        .flush()
                        .map_err(|_| Sense::new(SenseKey::MediumError, asc::WRITE_ERROR))?;
                }
                Ok(CommandOutcome::good())
            }
            Cdb::PreventAllow { prevent } => {
                // 10b and 11b are obsolete in SBC-3; the medium is not
                // removable so 00b/01b have no further effect.
                if prevent > 1 {
                    return Err(Sense::invalid_cdb_field(4, Some(1)));
                }
                Ok(CommandOutcome::good())
            }
            Cdb::SendDiagnostic {
                self_test_code,
                self_test,
                param_len,
                ..
            } => {
                if self_test_code != 0 {
                    // Background self-tests are not implemented.
                    return Err(Sense::invalid_cdb_field(1, Some(7)));
                }
                if param_len != 0 {
                    // No diagnostic pages are supported: the page code of
                    // whatever was sent is not one.
                    return Err(Sense::invalid_param_field(0, None));
                }
                if self_test {
                    self.default_self_test()?;
                }
                Ok(CommandOutcome::good())
            }
            Cdb::ReadDefectData {
                twelve,
                plist,
                glist,
                format,
                alloc_len,
            } => {
                // No defects: an empty list in the requested format.
                let flags = u8::from(plist) << 4 | u8::from(glist) << 3 | format;
                let d = if twelve {
                    vec![0, flags, 0, 0, 0, 0, 0, 0]
                } else {
                    vec![0, flags, 0, 0]
                };
                Ok(cut(d, alloc_len as usize))
            }
            Cdb::ReportLuns {
                select_report,
                alloc_len,
            } => Ok(report_luns(
                select_report,
                alloc_len,
                req.luns.unwrap_or(&self.cfg.luns),
            )),
            Cdb::ReportTargetPortGroups {
                extended,
                alloc_len,
            } => Ok(self.report_tpgs(extended, alloc_len)),
            Cdb::ReportSupportedOpcodes {
                rctd,
                options,
                opcode,
                service_action,
                alloc_len,
            } => report_opcodes(
                rctd,
                options,
                opcode,
                service_action,
                alloc_len,
                !self.reservations.offers_compare_and_write(),
            ),
            // Reservation commands are routed before decoding; REQUEST
            // SENSE and the SBC commands are handled by the caller.
            _ => Err(Sense::illegal_request(asc::INVALID_COMMAND_OPERATION_CODE)),
        }
    }

    /// The default self-test (SPC-4 5.13.2): the medium must be readable
    /// at both ends and the cache must flush.
    fn default_self_test(&self) -> Result<(), Sense> {
        let failed = |e: std::io::Error| {
            tracing::warn!(error = %e, lun = self.cfg.lun, "default self-test failed");
            Sense::new(SenseKey::HardwareError, asc::LOGICAL_UNIT_FAILED_SELF_TEST)
        };
        let bs = self.cfg.block_size as usize;
        let mut buf = vec![0u8; bs];
        self.backend.read_at(&mut buf, 0).map_err(failed)?;
        self.backend
            .read_at(&mut buf, self.bytes(self.blocks() - 1))
            .map_err(failed)?;
        if !self.write_protected() {
            self.backend.flush().map_err(failed)?;
        }
        Ok(())
    }

    fn standard_inquiry(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(96);
        d.push(0x00); // peripheral qualifier 000b, direct access block device
        d.push(0x00); // RMB = 0
        d.push(0x06); // VERSION: SPC-4
        d.push(0x12); // HISUP, RESPONSE DATA FORMAT 2
        d.push(0); // ADDITIONAL LENGTH, below
        d.push(0x10); // TPGS = 01b: implicit ALUA; 3PC = 0; PROTECT = 0
        d.push(if self.target_ports().len() > 1 {
            0x10
        } else {
            0
        }); // MULTIP
        d.push(0x02); // CMDQUE
        vpd::ascii_field(&mut d, &self.cfg.vendor, 8);
        vpd::ascii_field(&mut d, &self.cfg.product, 16);
        vpd::ascii_field(&mut d, &self.cfg.revision, 4);
        d.resize(58, 0);
        // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3 (no version
        // claimed).
        for v in [0x00a0u16, 0x0960, 0x0460, 0x04c0] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        d.resize(96, 0);
        d[4] = (d.len() - 5) as u8;
        d
    }

    fn vpd_page(&self, req: &CommandRequest<'_>, page: u8) -> Result<Vec<u8>, Sense> {
        let mut d = vec![0x00, page, 0, 0];
        match page {
            vpd::SUPPORTED_PAGES => d.extend_from_slice(&[
                vpd::SUPPORTED_PAGES,
                vpd::UNIT_SERIAL_NUMBER,
                vpd::DEVICE_IDENTIFICATION,
                vpd::EXTENDED_INQUIRY,
                vpd::BLOCK_LIMITS,
                vpd::BLOCK_DEVICE_CHARACTERISTICS,
                vpd::LOGICAL_BLOCK_PROVISIONING,
            ]),
            vpd::UNIT_SERIAL_NUMBER => d.extend_from_slice(self.cfg.serial.as_bytes()),
            vpd::DEVICE_IDENTIFICATION => self.device_identification(req, &mut d),
            vpd::EXTENDED_INQUIRY => {
                d.resize(64, 0);
                // SIMPSUP: simple task attribute. No head of queue or
                // ordered guarantees, no protection, no non-volatile cache.
                d[5] = 0x01;
            }
            vpd::BLOCK_LIMITS => {
                d.resize(64, 0);
                let sh = self.block_shift;
                let put32 = |d: &mut Vec<u8>, at: usize, v: u64| {
                    d[at..at + 4]
                        .copy_from_slice(&(v.min(u64::from(u32::MAX)) as u32).to_be_bytes())
                };
                d[4] = 0; // WSNZ = 0: WRITE SAME with 0 blocks runs to the end
                          // A clustered LU without a cluster-wide lock does not
                          // offer COMPARE AND WRITE: MAXIMUM COMPARE AND WRITE 0.
                d[5] = if self.reservations.offers_compare_and_write() {
                    MAX_COMPARE_AND_WRITE_BLOCKS
                } else {
                    0
                };
                let gran = (UNMAP_GRANULARITY_BYTES >> sh).max(1);
                d[6..8].copy_from_slice(&(gran as u16).to_be_bytes());
                put32(&mut d, 8, self.max_transfer_blocks().into());
                put32(&mut d, 12, OPTIMAL_TRANSFER_BYTES >> sh);
                put32(&mut d, 16, self.max_transfer_blocks().into()); // MAXIMUM PREFETCH LENGTH
                put32(&mut d, 20, MAX_UNMAP_BYTES >> sh);
                put32(&mut d, 24, MAX_UNMAP_DESCRIPTORS.into());
                put32(&mut d, 28, gran);
                // UGAVALID, UNMAP GRANULARITY ALIGNMENT 0.
                put32(&mut d, 32, 0x8000_0000);
                d[36..44].copy_from_slice(&(MAX_WRITE_SAME_BYTES >> sh).to_be_bytes());
            }
            vpd::BLOCK_DEVICE_CHARACTERISTICS => {
                d.resize(64, 0);
                d[5] = 0x01; // MEDIUM ROTATION RATE 0001h: non-rotating
            }
            vpd::LOGICAL_BLOCK_PROVISIONING => {
                d.resize(8, 0);
                // LBPU, LBPWS, LBPWS10, LBPRZ; ANC_SUP = 0, DP = 0.
                let lbprz = if self.backend.discard_zeroes() {
                    0x04
                } else {
                    0
                };
                d[5] = 0x80 | 0x40 | 0x20 | lbprz;
                d[6] = 0x02; // PROVISIONING TYPE: thin
            }
            _ => return Err(Sense::invalid_cdb_field(2, Some(7))),
        }
        let len = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&len.to_be_bytes());
        Ok(d)
    }

    fn device_identification(&self, req: &CommandRequest<'_>, d: &mut Vec<u8>) {
        use Association::*;
        vpd::push_designator(
            d,
            CodeSet::Binary,
            LogicalUnit,
            DesignatorType::Naa,
            &self.cfg.naa,
        );
        let mut t10 = Vec::with_capacity(8 + self.cfg.serial.len());
        vpd::ascii_field(&mut t10, &self.cfg.vendor, 8);
        t10.extend_from_slice(self.cfg.serial.as_bytes());
        vpd::push_designator(
            d,
            CodeSet::Ascii,
            LogicalUnit,
            DesignatorType::T10VendorId,
            &t10,
        );
        // The target port the command came through.
        let ports = self.target_ports();
        let port = ports
            .iter()
            .find(|p| p.tpgt == req.nexus.target.tpgt && p.name == req.nexus.target.name)
            .unwrap_or(&req.nexus.target);
        vpd::push_designator(
            d,
            CodeSet::Binary,
            TargetPort,
            DesignatorType::RelativeTargetPort,
            &[0, 0, (port.relative_id >> 8) as u8, port.relative_id as u8],
        );
        vpd::push_designator(
            d,
            CodeSet::Binary,
            TargetPort,
            DesignatorType::TargetPortGroup,
            &[0, 0, (port.tpgt >> 8) as u8, port.tpgt as u8],
        );
        vpd::push_designator(
            d,
            CodeSet::Utf8,
            TargetPort,
            DesignatorType::ScsiNameString,
            port.to_string().as_bytes(),
        );
        vpd::push_designator(
            d,
            CodeSet::Utf8,
            TargetDevice,
            DesignatorType::ScsiNameString,
            self.cfg.target_name.to_ascii_lowercase().as_bytes(),
        );
    }

    fn report_tpgs(&self, extended: bool, alloc_len: u32) -> CommandOutcome {
        let all = self.target_ports();
        let mut groups: Vec<u16> = all.iter().map(|p| p.tpgt).collect();
        groups.sort_unstable();
        groups.dedup();
        let mut d = vec![0u8; 4];
        if extended {
            // FORMAT TYPE 001b; IMPLICIT TRANSITION TIME 0.
            d.extend_from_slice(&[0x10, 0, 0, 0]);
        }
        for g in groups {
            let ports: Vec<u16> = all
                .iter()
                .filter(|p| p.tpgt == g)
                .map(|p| p.relative_id)
                .collect();
            // PREF = 0, state 0h active/optimized; AO_SUP only.
            d.extend_from_slice(&[0x00, 0x01]);
            d.extend_from_slice(&g.to_be_bytes());
            d.extend_from_slice(&[0, 0, 0, ports.len().min(255) as u8]);
            for r in ports.iter().take(255) {
                d.extend_from_slice(&[0, 0]);
                d.extend_from_slice(&r.to_be_bytes());
            }
        }
        let len = (d.len() - 4) as u32;
        d[..4].copy_from_slice(&len.to_be_bytes());
        cut(d, alloc_len as usize)
    }

    fn mode_page(&self, page: u8, pc: u8) -> Vec<u8> {
        match page {
            PAGE_CACHING => {
                let mut p = vec![0u8; 20];
                p[0] = PAGE_CACHING;
                p[1] = 18;
                p[2] = match pc {
                    PC_CHANGEABLE => 0x04,
                    PC_DEFAULT => 0x04,
                    _ => u8::from(self.mode.wce.load(Ordering::Relaxed)) << 2,
                };
                p
            }
            _ => {
                let mut p = vec![0u8; 12];
                p[0] = PAGE_CONTROL;
                p[1] = 10;
                if pc == PC_CHANGEABLE {
                    p[2] = 0x04; // D_SENSE
                    p[4] = 0x08; // SWP
                    return p;
                }
                // GLTSD = 1 (no log parameters are saved); D_SENSE: fixed
                // format sense data by default.
                p[2] = 0x02;
                if pc == PC_CURRENT && self.mode.d_sense.load(Ordering::Relaxed) {
                    p[2] |= 0x04;
                }
                // QUEUE ALGORITHM MODIFIER 1: commands may be reordered
                // (they run concurrently); QERR 00b.
                p[3] = self.mode.qam.load(Ordering::Relaxed) << 4;
                if pc == PC_CURRENT && self.mode.swp.load(Ordering::Relaxed) {
                    p[4] = 0x08;
                }
                // TAS = 0: tasks aborted by another I_T nexus end silently.
                p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // BUSY TIMEOUT PERIOD: unlimited
                p
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn mode_sense(
        &self,
        req: &CommandRequest<'_>,
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc_len: u16,
    ) -> Result<CommandOutcome, Sense> {
        if pc == 3 {
            return Err(Sense::illegal_request(asc::SAVING_PARAMETERS_NOT_SUPPORTED));
        }
        let pages: &[u8] = match page {
            ALL_PAGES => &MODE_PAGES,
            PAGE_CACHING => &MODE_PAGES[..1],
            PAGE_CONTROL => &MODE_PAGES[1..],
            _ => return Err(Sense::invalid_cdb_field(2, Some(5))),
        };
        // Only subpage 0 exists; FFh asks for all subpages of the page(s).
        if subpage != 0 && subpage != 0xff {
            return Err(Sense::invalid_cdb_field(3, Some(7)));
        }
        let mut d = Vec::with_capacity(64);
        let wp = if req.read_only || self.write_protected() {
            0x80
        } else {
            0
        };
        let dev_specific = wp | 0x10; // DPOFUA
        let long = ten && llbaa && self.blocks() > 0xffff_ffff;
        let mut bd = Vec::new();
        if !dbd {
            if long {
                bd.extend_from_slice(&self.blocks().to_be_bytes());
                bd.extend_from_slice(&[0; 4]);
                bd.extend_from_slice(&self.cfg.block_size.to_be_bytes());
            } else {
                bd.extend_from_slice(&(self.blocks().min(0xffff_ffff) as u32).to_be_bytes());
                bd.push(0);
                bd.extend_from_slice(&self.cfg.block_size.to_be_bytes()[1..]);
            }
        }
        if ten {
            d.extend_from_slice(&[0, 0, 0, dev_specific, u8::from(long), 0]);
            d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
        } else {
            d.extend_from_slice(&[0, 0, dev_specific, bd.len() as u8]);
        }
        d.extend_from_slice(&bd);
        for &p in pages {
            d.extend_from_slice(&self.mode_page(p, pc));
        }
        if ten {
            let n = (d.len() - 2) as u16;
            d[..2].copy_from_slice(&n.to_be_bytes());
        } else {
            d[0] = (d.len() - 1) as u8;
        }
        Ok(cut(d, alloc_len.into()))
    }

    fn mode_select(
        &self,
        req: &CommandRequest<'_>,
        ten: bool,
        pf: bool,
        sp: bool,
        param_len: u16,
    ) -> Result<CommandOutcome, Sense> {
        if !pf {
            return Err(Sense::invalid_cdb_field(1, Some(4)));
        }
        if sp {
            return Err(Sense::invalid_cdb_field(1, Some(0)));
        }
        if param_len == 0 {
            return Ok(CommandOutcome::good());
        }
        let plen_err = || Sense::illegal_request(asc::PARAMETER_LIST_LENGTH_ERROR);
        let p = req
            .data_out
            .get(..usize::from(param_len))
            .ok_or_else(plen_err)?;
        let hdr = if ten { 8 } else { 4 };
        if p.len() < hdr {
            return Err(plen_err());
        }
        let (bd_len, long) = if ten {
            (usize::from(u16::from_be_bytes([p[6], p[7]])), p[4] & 1 != 0)
        } else {
            (usize::from(p[3]), false)
        };
        let bd = p.get(hdr..hdr + bd_len).ok_or_else(plen_err)?;
        let bd_size = if long { 16 } else { 8 };
        if bd_len % bd_size != 0 {
            return Err(Sense::invalid_param_field(if ten { 6 } else { 3 }, None));
        }
        for (i, desc) in bd.chunks(bd_size).enumerate() {
            let at = hdr + i * bd_size;
            let (blocks, bl, bl_at) = if long {
                (
                    u64::from_be_bytes(desc[..8].try_into().unwrap_or_default()),
                    u32::from_be_bytes(desc[12..16].try_into().unwrap_or_default()),
                    at + 12,
                )
            } else {
                (
                    u64::from(u32::from_be_bytes(desc[..4].try_into().unwrap_or_default())),
                    u32::from_be_bytes([0, desc[5], desc[6], desc[7]]),
                    at + 5,
                )
            };
            if bl != self.cfg.block_size {
                return Err(Sense::invalid_param_field(bl_at as u16, None));
            }
            let cur = if long {
                self.blocks()
            } else {
                self.blocks().min(0xffff_ffff)
            };
            if blocks != 0 && blocks != cur {
                return Err(Sense::invalid_param_field(at as u16, None));
            }
        }
        // Validate every page before changing anything.
        let mut pos = hdr + bd_len;
        let mut changes: Vec<(u8, Vec<u8>)> = Vec::new();
        while pos < p.len() {
            let code = p[pos];
            if code & 0x40 != 0 {
                // SPF: keyfence has no subpages.
                return Err(Sense::invalid_param_field(pos as u16, Some(6)));
            }
            let page = code & 0x3f;
            if !MODE_PAGES.contains(&page) {
                return Err(Sense::invalid_param_field(pos as u16, Some(5)));
            }
            let len = usize::from(*p.get(pos + 1).ok_or_else(plen_err)?);
            let body = p.get(pos..pos + 2 + len).ok_or_else(plen_err)?;
            let cur = self.mode_page(page, PC_CURRENT);
            let mask = self.mode_page(page, PC_CHANGEABLE);
            if body.len() != cur.len() {
                return Err(Sense::invalid_param_field((pos + 1) as u16, Some(7)));
            }
            for i in 2..cur.len() {
                let bad = (body[i] ^ cur[i]) & !mask[i];
                if bad != 0 {
                    let bit = 7 - bad.leading_zeros() as u8;
                    return Err(Sense::invalid_param_field((pos + i) as u16, Some(bit)));
                }
            }
            changes.push((page, body.to_vec()));
            pos += 2 + len;
        }
        let mut changed = false;
        for (page, body) in changes {
            match page {
                PAGE_CACHING => {
                    let wce = body[2] & 0x04 != 0;
                    if self.mode.wce.swap(wce, Ordering::SeqCst) != wce {
                        changed = true;
                        if !wce {
                            // From now on writes are durable at GOOD: make
                            // what the cache holds durable too.
                            self.backend
                                .flush()
                                .map_err(|_| Sense::new(SenseKey::MediumError, asc::WRITE_ERROR))?;
                        }
                    }
                }
                _ => {
                    let swp = body[4] & 0x08 != 0;
                    changed |= self.mode.swp.swap(swp, Ordering::SeqCst) != swp;
                    let d_sense = body[2] & 0x04 != 0;
                    changed |= self.mode.d_sense.swap(d_sense, Ordering::SeqCst) != d_sense;
                }
            }
        }
        if changed {
            self.ua
                .queue(UaScope::AllExcept(req.nexus), asc::MODE_PARAMETERS_CHANGED);
        }
        Ok(CommandOutcome::good())
    }
}

/// One command descriptor of REPORT SUPPORTED OPERATION CODES, all
/// commands format (SPC-4 6.35.2).
fn command_descriptor(c: &CommandInfo, rctd: bool, d: &mut Vec<u8>) {
    d.push(c.opcode);
    d.push(0);
    d.extend_from_slice(&u16::from(c.service_action.unwrap_or(0)).to_be_bytes());
    d.push(0);
    d.push(u8::from(rctd) << 1 | u8::from(c.service_action.is_some()));
    d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
    if rctd {
        timeouts_descriptor(c, d);
    }
}

fn timeouts_descriptor(c: &CommandInfo, d: &mut Vec<u8>) {
    d.extend_from_slice(&[0x00, 0x0a, 0, 0]);
    d.extend_from_slice(&c.nominal_timeout.to_be_bytes());
    d.extend_from_slice(&c.recommended_timeout.to_be_bytes());
}

fn report_opcodes(
    rctd: bool,
    options: u8,
    op: u8,
    sa: u16,
    alloc_len: u32,
    no_compare_and_write: bool,
) -> Result<CommandOutcome, Sense> {
    let offered = |c: &&CommandInfo| !(no_compare_and_write && c.opcode == 0x89);
    if options == 0 {
        let mut d = vec![0u8; 4];
        for c in COMMANDS.iter().filter(offered) {
            command_descriptor(c, rctd, &mut d);
        }
        let n = (d.len() - 4) as u32;
        d[..4].copy_from_slice(&n.to_be_bytes());
        return Ok(cut(d, alloc_len as usize));
    }
    let has_sa = opcode::has_service_action(op);
    let found = match options {
        // One command without service action: invalid for a command
        // that has service actions.
        1 if has_sa => return Err(Sense::invalid_cdb_field(2, Some(2))),
        1 => opcode::lookup(op, None),
        // One command with a service action: invalid for one that has
        // none.
        2 if !has_sa => return Err(Sense::invalid_cdb_field(2, Some(2))),
        2 => u8::try_from(sa)
            .ok()
            .and_then(|s| opcode::lookup(op, Some(s))),
        // 3: with or without, as the command has.
        _ if has_sa => u8::try_from(sa)
            .ok()
            .and_then(|s| opcode::lookup(op, Some(s))),
        _ => {
            if sa != 0 {
                return Err(Sense::invalid_cdb_field(4, Some(7)));
            }
            opcode::lookup(op, None)
        }
    };
    let found = found.filter(offered);
    let mut d = vec![0u8; 4];
    match found {
        Some(c) => {
            // SUPPORT 011b: supported, in conformance with a standard.
            d[1] = u8::from(rctd) << 7 | 0x03;
            d[2..4].copy_from_slice(&(c.usage.len() as u16).to_be_bytes());
            d.extend_from_slice(c.usage);
            if rctd {
                timeouts_descriptor(c, &mut d);
            }
        }
        None => d[1] = 0x01, // SUPPORT 001b: not supported
    }
    Ok(cut(d, alloc_len as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_encoding() {
        assert_eq!(encode_lun(5), [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_lun(0x1234), [0x52, 0x34, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn descriptor_sense_carries_information_and_field_pointer() {
        let s = Sense::invalid_cdb_field(2, Some(7));
        let b = encode_sense(&s, true);
        assert_eq!(&b[..4], &[0x72, 0x05, 0x24, 0x00]);
        assert_eq!(b[7] as usize, b.len() - 8);
        assert_eq!(&b[8..12], &[0x02, 0x06, 0, 0]);
        assert_eq!(b[12], 0x80 | 0x40 | 0x08 | 7);
        let m = Sense::new(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY).with_information(9);
        let b = encode_sense(&m, true);
        assert_eq!(&b[8..12], &[0x00, 0x0a, 0x80, 0]);
        assert_eq!(b[19], 9);
    }
}
