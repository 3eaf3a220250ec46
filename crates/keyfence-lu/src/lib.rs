//! keyfence-lu: a SCSI block logical unit (SBC-3 direct-access device
//! server) over a [`BlockBackend`], and the backends themselves ([`backend`]:
//! files, block devices, memory).
//!
//! This crate owns device emulation and nothing of any transport: no
//! sockets, no async runtime, no iSCSI.
//!
//! The LU is synchronous and transport agnostic: the server hands it one
//! [`CommandRequest`] (nexus, CDB, data-out buffer) and gets back a
//! [`CommandOutcome`] (status, sense, data-in, effects). It may be called
//! concurrently from any number of threads and takes no lock shared by all
//! sessions on the READ/WRITE path: reads take no lock at all, writes take
//! shared locks on the LBA stripes they touch, and COMPARE AND WRITE and
//! ORWRITE take their stripes exclusively so that the read-compare/modify-
//! write is atomic against every other writer.
//!
//! Every command passes one gate first ([`LogicalUnit::execute`]): the unit
//! attention check of its I_T nexus, then the reservation gate owned by
//! [`reservation::Reservations`].

pub mod backend;
mod rangelock;
pub mod reservation;
mod sbc;
mod spc;
pub mod ua;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use keyfence_scsi::cdb::{self, Cdb};
use keyfence_scsi::sense::{asc, Asc};
use keyfence_scsi::{Nexus, ScsiStatus, Sense, TargetPort};

use crate::backend::BlockBackend;
pub use rangelock::HeldRange;
pub use reservation::Reservations;
pub use ua::{UaScope, UnitAttentions};

/// Errors building a logical unit.
#[derive(Debug, thiserror::Error)]
pub enum LuError {
    #[error("block size {0} is not supported (512 or 4096)")]
    BlockSize(u32),
    #[error("backend size {size} is not a multiple of the block size {block_size}")]
    Unaligned { size: u64, block_size: u32 },
    #[error("backend is empty")]
    Empty,
    #[error("LUN {0} is out of range (flat space addressing: 0..16383)")]
    Lun(u64),
    #[error("{field} is {len} bytes long; at most {max} allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("a logical unit needs at least one target port")]
    NoTargetPort,
}

/// The LUNs a target exposes, shared by all of its LUs for REPORT LUNS.
/// The server owns it and replaces the list when LUs come and go.
#[derive(Debug)]
pub struct TargetLuns {
    luns: ArcSwap<Vec<u64>>,
}

impl TargetLuns {
    pub fn new(mut luns: Vec<u64>) -> Self {
        luns.sort_unstable();
        luns.dedup();
        TargetLuns {
            luns: ArcSwap::from_pointee(luns),
        }
    }

    /// Replace the list (the caller queues REPORTED LUNS DATA HAS CHANGED).
    pub fn set(&self, mut luns: Vec<u64>) {
        luns.sort_unstable();
        luns.dedup();
        self.luns.store(Arc::new(luns));
    }

    pub fn get(&self) -> Arc<Vec<u64>> {
        self.luns.load_full()
    }
}

/// What a logical unit is and how it presents itself.
#[derive(Debug, Clone)]
pub struct LuConfig {
    pub lun: u64,
    /// 512 or 4096.
    pub block_size: u32,
    pub read_only: bool,
    /// T10 vendor identification, at most 8 ASCII characters.
    pub vendor: String,
    /// At most 16 ASCII characters.
    pub product: String,
    /// At most 4 ASCII characters.
    pub revision: String,
    /// Unit serial number (VPD 80h), ASCII.
    pub serial: String,
    /// NAA identifier (VPD 83h). Type 6 (IEEE Registered Extended) uses
    /// all 16 bytes; types 2, 3 and 5 use the first 8 (the rest is
    /// ignored).
    pub naa: [u8; 16],
    /// The iSCSI target name the LU is served under.
    pub target_name: String,
    /// The target ports through which the LU is reachable. Each portal
    /// group (TPGT) forms one ALUA target port group with id = TPGT.
    pub target_ports: Vec<TargetPort>,
    /// All LUNs of the target, for REPORT LUNS.
    pub luns: Arc<TargetLuns>,
    /// Where the reservation engine keeps APTPL state, if anywhere.
    pub pr_state_path: Option<PathBuf>,
    /// Cluster mode: the reservation state shared by the gateways (then
    /// `pr_state_path` is not used).
    pub shared_pr: Option<Arc<dyn reservation::SharedPrState>>,
    /// A store for the APTPL state other than the file at
    /// `pr_state_path` (which is then not used): for instrumentation and
    /// tests of a slow or failing store.
    pub pr_store: Option<Arc<dyn keyfence_pr::PrStore>>,
}

/// IEEE company_id used in derived NAA identifiers: a CID (the local-bit
/// pattern 1010b in the low nibble of the first octet), not an OUI.
pub const KEYFENCE_CID: u32 = 0x5a_4b_46;

impl LuConfig {
    /// A configuration with keyfence defaults and an NAA identifier and
    /// serial number derived from the target name and LUN, so they are
    /// stable across restarts.
    pub fn new(
        target_name: &str,
        lun: u64,
        target_ports: Vec<TargetPort>,
        luns: Arc<TargetLuns>,
    ) -> Self {
        let naa = derive_naa(target_name, lun);
        let serial: String = naa[8..].iter().map(|b| format!("{b:02x}")).collect();
        LuConfig {
            lun,
            block_size: 512,
            read_only: false,
            vendor: "KEYFENCE".into(),
            product: "keyfence-lu".into(),
            revision: concat!(
                env!("CARGO_PKG_VERSION_MAJOR"),
                ".",
                env!("CARGO_PKG_VERSION_MINOR")
            )
            .chars()
            .take(4)
            .collect(),
            serial,
            naa,
            target_name: target_name.to_owned(),
            target_ports,
            luns,
            pr_state_path: None,
            shared_pr: None,
            pr_store: None,
        }
    }
}

/// NAA type 6 identifier from a 128-bit FNV-1a hash of `target name` and
/// `lun`: NAA=6, company_id [`KEYFENCE_CID`], then 100 hash bits.
pub fn derive_naa(target_name: &str, lun: u64) -> [u8; 16] {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for b in target_name
        .to_ascii_lowercase()
        .bytes()
        .chain([0u8])
        .chain(lun.to_be_bytes())
    {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    let hb = h.to_be_bytes();
    let mut out = [0u8; 16];
    // NAA (4 bits) | company_id (24 bits) | vendor specific (36 + 64 bits)
    let head: u64 = (6u64 << 60)
        | (u64::from(KEYFENCE_CID) << 36)
        | (u64::from_be_bytes(hb[..8].try_into().unwrap_or_default()) >> 28);
    out[..8].copy_from_slice(&head.to_be_bytes());
    out[8..].copy_from_slice(&hb[8..]);
    out
}

/// One SCSI command as the transport delivered it.
#[derive(Debug, Clone, Copy)]
pub struct CommandRequest<'a> {
    pub nexus: &'a Nexus,
    /// The CDB (iSCSI pads to 16 bytes; the LU uses the length the
    /// operation code implies).
    pub cdb: &'a [u8],
    /// All data-out bytes received for the command.
    pub data_out: &'a [u8],
    /// The nexus sees this LU read-only (an initiator ACL maps it so):
    /// writes fail with WRITE PROTECTED and MODE SENSE sets WP, whatever
    /// the LU itself allows.
    pub read_only: bool,
    /// The LUNs this nexus sees, for REPORT LUNS, when an initiator ACL
    /// narrows or renumbers them; `None`: every LUN of the target.
    pub luns: Option<&'a TargetLuns>,
}

/// Side effects the transport must carry out after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LuEffect {
    /// Abort every task of this LU received on `nexus` (PREEMPT AND ABORT),
    /// other than the one that produced the effect.
    AbortTasks { nexus: Nexus },
}

/// The result of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    pub status: ScsiStatus,
    /// Set with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data-in, already cut to the allocation length; the transport
    /// computes residuals against its expected transfer length.
    pub data_in: Bytes,
    pub effects: Vec<LuEffect>,
}

impl CommandOutcome {
    pub fn good() -> Self {
        Self::with_status(ScsiStatus::Good)
    }

    pub fn with_status(status: ScsiStatus) -> Self {
        CommandOutcome {
            status,
            sense: None,
            data_in: Bytes::new(),
            effects: Vec::new(),
        }
    }

    pub fn data(data: impl Into<Bytes>) -> Self {
        CommandOutcome {
            data_in: data.into(),
            ..Self::good()
        }
    }

    pub fn check_condition(sense: Sense) -> Self {
        CommandOutcome {
            sense: Some(sense),
            ..Self::with_status(ScsiStatus::CheckCondition)
        }
    }

    pub fn reservation_conflict() -> Self {
        Self::with_status(ScsiStatus::ReservationConflict)
    }
}

impl From<Sense> for CommandOutcome {
    fn from(s: Sense) -> Self {
        Self::check_condition(s)
    }
}

/// What the reservation engine is given when the LU is built.
#[derive(Debug, Clone)]
pub struct ReservationContext {
    pub lun: u64,
    /// The LU's target ports (for ALL_TG_PT and READ FULL STATUS).
    pub target_ports: Vec<TargetPort>,
    /// Queue unit attentions (RESERVATIONS PREEMPTED, ...) through this.
    pub unit_attentions: Arc<UnitAttentions>,
    pub state_path: Option<PathBuf>,
}

/// Mode parameters that can change (control and caching pages).
#[derive(Debug)]
pub(crate) struct ModeState {
    /// Caching page: write cache enabled.
    pub wce: AtomicBool,
    /// Control page: descriptor-format sense requested.
    pub d_sense: AtomicBool,
    /// Control page: software write protect.
    pub swp: AtomicBool,
    /// Control page: QUEUE ALGORITHM MODIFIER.
    pub qam: AtomicU8,
}

/// A block logical unit.
#[derive(Debug)]
pub struct LogicalUnit {
    pub(crate) cfg: LuConfig,
    pub(crate) backend: Arc<dyn BlockBackend>,
    /// Number of logical blocks; grows when the backing store does
    /// ([`LogicalUnit::grow`]).
    pub(crate) blocks: AtomicU64,
    pub(crate) block_shift: u32,
    pub(crate) ua: Arc<UnitAttentions>,
    pub(crate) reservations: Reservations,
    pub(crate) mode: ModeState,
    pub(crate) locks: rangelock::RangeLocks,
    /// Cluster mode: ranges held for other gateways' COMPARE AND WRITEs.
    pub(crate) held: rangelock::HeldRanges,
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), LuError> {
    if s.len() > max || !s.is_ascii() {
        return Err(LuError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

impl LogicalUnit {
    pub fn new(cfg: LuConfig, backend: Arc<dyn BlockBackend>) -> Result<Self, LuError> {
        let block_shift = match cfg.block_size {
            512 => 9,
            4096 => 12,
            b => return Err(LuError::BlockSize(b)),
        };
        let size = backend.len();
        if size == 0 {
            return Err(LuError::Empty);
        }
        if size.rem_euclid(u64::from(cfg.block_size)) != 0 {
            return Err(LuError::Unaligned {
                size,
                block_size: cfg.block_size,
            });
        }
        if cfg.lun > 0x3fff {
            return Err(LuError::Lun(cfg.lun));
        }
        if cfg.target_ports.is_empty() {
            return Err(LuError::NoTargetPort);
        }
        check_len("vendor", &cfg.vendor, 8)?;
        check_len("product", &cfg.product, 16)?;
        check_len("revision", &cfg.revision, 4)?;
        check_len("serial", &cfg.serial, 252)?;
        let ua = Arc::new(UnitAttentions::new());
        let rctx = ReservationContext {
            lun: cfg.lun,
            target_ports: cfg.target_ports.clone(),
            unit_attentions: ua.clone(),
            state_path: cfg.pr_state_path.clone(),
        };
        let reservations = match (&cfg.shared_pr, &cfg.pr_store) {
            (Some(shared), _) => Reservations::with_shared(rctx, shared.clone()),
            (None, Some(store)) => Reservations::with_store(rctx, Some(store.clone())),
            (None, None) => Reservations::new(rctx),
        };
        Ok(LogicalUnit {
            blocks: AtomicU64::new(size >> block_shift),
            block_shift,
            ua,
            reservations,
            mode: ModeState {
                wce: AtomicBool::new(true),
                d_sense: AtomicBool::new(false),
                swp: AtomicBool::new(false),
                qam: AtomicU8::new(1),
            },
            locks: rangelock::RangeLocks::new(),
            held: rangelock::HeldRanges::default(),
            cfg,
            backend,
        })
    }

    pub fn config(&self) -> &LuConfig {
        &self.cfg
    }

    pub fn lun(&self) -> u64 {
        self.cfg.lun
    }

    /// Number of logical blocks.
    pub fn block_count(&self) -> u64 {
        self.blocks()
    }

    #[inline]
    pub(crate) fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }

    /// Grow the medium to `bytes` (a multiple of the block size, larger
    /// than now) and report the new capacity from then on. The caller
    /// queues CAPACITY DATA HAS CHANGED for the nexuses that see the LU.
    pub fn grow(&self, bytes: u64) -> std::io::Result<()> {
        let bs = u64::from(self.cfg.block_size);
        if bytes % bs != 0 || bytes <= self.blocks() << self.block_shift {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "new size {bytes} is not larger than {} and a multiple of {bs}",
                    self.blocks() << self.block_shift
                ),
            ));
        }
        self.backend.grow(bytes)?;
        self.blocks
            .store(bytes >> self.block_shift, Ordering::Relaxed);
        Ok(())
    }

    /// The storage the LU sits on.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// Make every completed write durable (shutdown, cache flush on
    /// demand).
    pub fn flush(&self) -> std::io::Result<()> {
        self.backend.flush()
    }

    pub fn reservations(&self) -> &Reservations {
        &self.reservations
    }

    /// The target ports the LU is reachable through now (those of its
    /// configuration until [`LogicalUnit::set_target_ports`]).
    pub fn target_ports(&self) -> Arc<Vec<TargetPort>> {
        self.reservations.target_ports()
    }

    /// Replace the target ports (portal groups added or removed while
    /// serving): INQUIRY's MULTIP bit, REPORT TARGET PORT GROUPS, the
    /// Device Identification page and the reservation engine use the new
    /// set from the next command on. Empty sets are ignored (an LU is
    /// always reachable through some port).
    pub fn set_target_ports(&self, mut ports: Vec<TargetPort>) {
        if ports.is_empty() {
            return;
        }
        ports.sort_by_key(|p| p.tpgt);
        self.reservations.set_target_ports(ports);
    }

    /// The unit attention queues (shared with the reservation engine).
    pub fn unit_attentions(&self) -> &Arc<UnitAttentions> {
        &self.ua
    }

    /// Queue a unit attention for the nexuses in `scope`.
    pub fn queue_unit_attention(&self, scope: UaScope<'_>, code: Asc) {
        self.ua.queue(scope, code);
    }

    /// Bytes of data-out `cdb` implies (0 for commands without data-out),
    /// to compare with the iSCSI expected data transfer length. `None` when
    /// the CDB does not decode; `execute` then reports why.
    pub fn data_out_len(&self, cdb: &[u8]) -> Option<u64> {
        cdb::data_out_len(cdb, self.cfg.block_size).ok()
    }

    /// Check the transport's expected data-out length against a command
    /// whose data-out must be exactly what its CDB implies (COMPARE AND
    /// WRITE, WRITE SAME). Other commands tolerate overflow and underflow
    /// (the transport reports residuals; only whole blocks received are
    /// written). Call before collecting data; on `Err` answer CHECK
    /// CONDITION with the sense and do not execute.
    pub fn check_data_out_length(&self, cdb: &[u8], edtl: u64) -> Result<(), Sense> {
        let field = match cdb::parse(cdb) {
            Ok(Cdb::CompareAndWrite { .. }) => 13,
            Ok(Cdb::WriteSame { sixteen, .. }) => {
                if sixteen {
                    10
                } else {
                    7
                }
            }
            _ => return Ok(()),
        };
        match cdb::data_out_len(cdb, self.cfg.block_size) {
            Ok(want) if want != edtl => Err(Sense::invalid_cdb_field(field, Some(7))),
            _ => Ok(()),
        }
    }

    /// True when the command may block for long (cache flushes, FUA
    /// writes, unmapping, large WRITE SAME, and reservation changes, which
    /// may fsync APTPL state and, for PREEMPT AND ABORT, wait for the
    /// preempted nexuses' commands): run it on a blocking pool.
    pub fn is_blocking(&self, cdb: &[u8]) -> bool {
        matches!(cdb.first(), Some(0x5f | 0x16 | 0x56 | 0x17 | 0x57))
            || cdb::is_blocking(cdb, self.cfg.block_size)
            || !self.mode.wce.load(Ordering::Relaxed) && cdb::is_write(cdb)
    }

    /// Execute one command. Never panics on any input.
    pub fn execute(&self, req: &CommandRequest<'_>) -> CommandOutcome {
        let op = req.cdb.first().copied().unwrap_or(0xff);
        let nexus_state = self.ua.entry(req.nexus);
        // Unit attentions: INQUIRY, REPORT LUNS and REQUEST SENSE neither
        // report nor clear them (REQUEST SENSE returns it as its data).
        if !matches!(op, 0x12 | 0xa0 | 0x03) {
            if let Some(code) = nexus_state.take() {
                return CommandOutcome::check_condition(Sense::unit_attention(code));
            }
        }
        let reservation_command = matches!(op, 0x5e | 0x5f | 0x16 | 0x56 | 0x17 | 0x57);
        // Every other command counts as in flight from the reservation
        // check until its medium access is over, so PREEMPT AND ABORT can
        // wait for the preempted nexus's commands (SPC-4 5.13.11.2.4).
        let _inflight = (!reservation_command).then(|| self.ua.enter(&nexus_state));
        // RESERVATION CONFLICT, or DATA PROTECT while PR information is
        // lost (SPC-5 5.13.5.3).
        if let Some(o) = self.reservations.gate(req.nexus, req.cdb) {
            return o;
        }
        if reservation_command {
            return self.reservations.execute(req.nexus, req.cdb, req.data_out);
        }
        // COMPARE AND WRITE is atomic across gateways only under the
        // cluster's lock for it: without one a clustered LU does not
        // offer it.
        if op == 0x89 && !self.reservations.offers_compare_and_write() {
            return CommandOutcome::check_condition(Sense::illegal_request(
                asc::INVALID_COMMAND_OPERATION_CODE,
            ));
        }
        let decoded = match cdb::parse(req.cdb) {
            Ok(c) => c,
            Err(s) => return CommandOutcome::check_condition(s),
        };
        match self.dispatch(req, decoded) {
            Ok(o) => o,
            Err(s) => CommandOutcome::check_condition(s),
        }
    }

    /// Execute a READ without waiting for the medium, when that can be
    /// told beforehand: `Some(outcome)` when it is done (its data was all
    /// in the backend's cache, or it ended at the reservation gate or a
    /// check of its CDB), exactly as [`LogicalUnit::execute`] would have
    /// answered. `None` when it must go through `execute` where it may
    /// wait: it is not a READ, it asks for FUA (read from the medium) or
    /// more than `max_bytes`, a unit attention is pending for the nexus
    /// (`execute` reports it), the backend has no cache (uncached I/O) or
    /// the data is not all cached. `None` changes nothing.
    pub fn try_read_nowait(
        &self,
        req: &CommandRequest<'_>,
        max_bytes: u64,
    ) -> Option<CommandOutcome> {
        // An uncached backend (direct I/O) never has the data at hand:
        // leave the command to `execute` without checking it twice.
        if !self.backend.may_read_nowait() {
            return None;
        }
        let Ok(Cdb::Read { lba, blocks, flags }) = cdb::parse(req.cdb) else {
            return None;
        };
        if flags.fua || self.bytes(blocks.into()) > max_bytes {
            return None;
        }
        let nexus_state = self.ua.entry(req.nexus);
        if nexus_state.is_pending() {
            return None;
        }
        // In flight from the reservation check on, as in `execute`.
        let _inflight = self.ua.enter(&nexus_state);
        if let Some(o) = self.reservations.gate(req.nexus, req.cdb) {
            return Some(o);
        }
        if let Err(s) = self
            .check_transfer(req.cdb, blocks)
            .and_then(|()| self.check_range(lba, blocks.into()))
        {
            return Some(CommandOutcome::check_condition(s));
        }
        let len = usize::try_from(self.bytes(blocks.into())).ok()?;
        self.backend
            .try_read_nowait(len, self.bytes(lba))
            .map(CommandOutcome::data)
    }

    fn dispatch(&self, req: &CommandRequest<'_>, c: Cdb) -> Result<CommandOutcome, Sense> {
        match c {
            Cdb::RequestSense { desc, alloc_len } => {
                Ok(self.request_sense(req.nexus, desc, alloc_len))
            }
            _ => self.dispatch_other(req, c),
        }
    }

    fn request_sense(&self, nexus: &Nexus, desc: bool, alloc_len: u8) -> CommandOutcome {
        let sense = match self.ua.take(nexus) {
            Some(code) => Sense::unit_attention(code),
            None => Sense::new(keyfence_scsi::SenseKey::NoSense, asc::NO_ADDITIONAL_SENSE),
        };
        let bytes = spc::encode_sense(&sense, desc || self.mode.d_sense.load(Ordering::Relaxed));
        let n = bytes.len().min(usize::from(alloc_len));
        CommandOutcome::data(Bytes::copy_from_slice(&bytes[..n]))
    }

    /// Sense data for a CHECK CONDITION of this LU as the transport must
    /// send it: fixed format, or descriptor format when the control mode
    /// page's D_SENSE bit is set.
    pub fn sense_bytes(&self, sense: &Sense) -> Bytes {
        Bytes::from(spc::encode_sense(
            sense,
            self.mode.d_sense.load(Ordering::Relaxed),
        ))
    }

    /// Cluster mode: may a write go to the medium now? Checked again right
    /// before every submission (each chunk of a long one), not only at the
    /// reservation check: a command that passed the check just before the
    /// gateway's serving deadline must not reach the disk after it. NOT
    /// READY, ASYMMETRIC ACCESS STATE TRANSITION otherwise (the initiator
    /// retries, here or through another gateway).
    pub(crate) fn may_submit(&self) -> Result<(), Sense> {
        if self.reservations.may_serve() {
            Ok(())
        } else {
            Err(Sense::new(
                keyfence_scsi::SenseKey::NotReady,
                asc::ASYMMETRIC_ACCESS_STATE_TRANSITION,
            ))
        }
    }

    /// Cluster mode: hold exactly `ranges` for other gateways' COMPARE AND
    /// WRITEs, and return once every command modifying the medium that
    /// overlaps a newly held range and was already past that check has
    /// finished. From then until the range is released (the next call
    /// without it) such commands wait — WRITE, WRITE AND VERIFY, WRITE
    /// SAME, UNMAP, ORWRITE — and fail with NOT READY, ASYMMETRIC ACCESS
    /// STATE TRANSITION if the gateway stops serving meanwhile. Blocks
    /// (on in-flight writes): not on an I/O worker.
    pub fn hold_ranges(&self, ranges: Vec<HeldRange>) {
        let (_, before) = self.held.get();
        let new: Vec<HeldRange> = ranges
            .iter()
            .filter(|r| !before.contains(r))
            .copied()
            .collect();
        self.held.set(false, ranges);
        for r in new {
            // Writes hold their stripes from the check to the end of the
            // write: once the stripes are ours, those that did not see
            // the range are done, and the rest see it.
            drop(self.locks.exclusive(r.lba, r.blocks));
        }
    }

    /// Cluster mode: hold every block until [`Self::hold_ranges`] says
    /// which ranges are held (the gateway (re)joins and has not read
    /// them yet).
    pub fn hold_all_ranges(&self) {
        self.held.set(true, Vec::new());
    }

    /// The ranges held now (`true`: every block).
    pub fn held_ranges(&self) -> (bool, Vec<HeldRange>) {
        self.held.get()
    }

    /// The I_T nexus is gone (session ended or connection lost). Blocks
    /// until its effects are in force (cluster mode: committed and applied
    /// by every live gateway); not on an I/O worker.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        self.nexus_lost_unless(nexus, &(Arc::new(|| false) as reservation::Superseded));
    }

    /// [`Self::nexus_lost`], except that the SPC-2 reservation is left
    /// alone when `superseded` says a new session of the nexus started
    /// meanwhile (see [`Reservations::on_nexus_loss`]).
    pub fn nexus_lost_unless(&self, nexus: &Nexus, superseded: &reservation::Superseded) {
        self.ua.nexus_lost(nexus);
        self.reservations.on_nexus_loss(nexus, superseded);
    }

    /// LOGICAL UNIT RESET task management function.
    pub fn lu_reset(&self) {
        self.ua.reset_all(asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
        self.reservations
            .on_lu_reset(asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
    }

    /// TARGET WARM RESET / TARGET COLD RESET.
    pub fn target_reset(&self, cold: bool) {
        self.ua.reset_all(if cold {
            asc::POWER_ON_OCCURRED
        } else {
            asc::POWER_ON_RESET_OR_BUS_DEVICE_RESET
        });
        self.reservations.on_target_reset();
    }
}

/// Answer a command addressed to a LUN the target does not have (SPC-4
/// 4.6.4.1 / SAM-5 5.11): INQUIRY reports peripheral qualifier 011b,
/// REPORT LUNS works, REQUEST SENSE reports LOGICAL UNIT NOT SUPPORTED,
/// everything else fails with that sense.
pub fn execute_no_lu(req: &CommandRequest<'_>, luns: &TargetLuns) -> CommandOutcome {
    spc::no_lu(req, luns)
}

#[cfg(test)]
mod tests;
