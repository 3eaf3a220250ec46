//! Typed SCSI-3 persistent reservations (SPC-4 5.13, 6.15, 6.16; SPC-5
//! REPLACE LOST RESERVATION) on a [`Device`].
//!
//! Every PERSISTENT RESERVE OUT call sends LU_SCOPE and returns `Ok(())` on
//! GOOD; RESERVATION CONFLICT comes back as [`Error::ReservationConflict`],
//! ILLEGAL REQUEST etc. as [`Error::CheckCondition`] with the sense data.
//! PERSISTENT RESERVE IN calls decode the parameter data with
//! `keyfence_scsi::pr_data`, growing the allocation length when the target says the
//! data did not fit.

use bytes::Bytes;
use keyfence_scsi::pr_data::{
    Capabilities, FullStatus, PrDataError, PrInAction, PrInCdb, PrOutAction, PrOutCdb, PrOutParams,
    PrType, ReadKeys, ReadReservation, RegisterMoveParams,
};
use keyfence_scsi::transport_id::TransportId;

use crate::commands::Command;
use crate::device::Device;
use crate::error::{Error, Result};

/// Flags of a REGISTER / REGISTER AND IGNORE EXISTING KEY.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterOptions {
    /// Activate persist through power loss.
    pub aptpl: bool,
    /// Register through every target port of the device.
    pub all_tg_pt: bool,
    /// Also register these initiator ports (SPEC_I_PT); REGISTER only.
    pub spec_i_pt: Vec<TransportId>,
}

/// Where REGISTER AND MOVE sends the reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveTarget {
    pub transport_id: TransportId,
    /// RELATIVE TARGET PORT IDENTIFIER of the port the reservation moves to.
    pub relative_target_port: u16,
    /// Unregister the I_T nexus that sends the command.
    pub unreg: bool,
    pub aptpl: bool,
}

/// Largest PR IN allocation length (16-bit field).
const MAX_ALLOC: usize = 0xffff;
/// First PR IN allocation length tried (sg_persist's default).
const FIRST_ALLOC: u16 = 8192;

impl Device {
    /// Send PERSISTENT RESERVE OUT with a basic parameter list.
    pub async fn pr_out(
        &self,
        action: PrOutAction,
        pr_type: Option<PrType>,
        params: &PrOutParams,
    ) -> Result<()> {
        let data = Bytes::from(params.encode());
        self.pr_out_raw(action, pr_type, data).await
    }

    async fn pr_out_raw(
        &self,
        action: PrOutAction,
        pr_type: Option<PrType>,
        data: Bytes,
    ) -> Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| Error::InvalidArgument("PR OUT parameter list too long".into()))?;
        let cdb = PrOutCdb::new(action, pr_type, len).encode();
        tracing::debug!(
            action = action.description(),
            ?pr_type,
            "PERSISTENT RESERVE OUT"
        );
        self.execute(&Command::write(cdb.to_vec(), data)).await?;
        Ok(())
    }

    /// REGISTER: change this I_T nexus' key from `key` (0 when not yet
    /// registered) to `new_key` (0 unregisters).
    pub async fn register(&self, key: u64, new_key: u64, opts: &RegisterOptions) -> Result<()> {
        let params = PrOutParams {
            reservation_key: key,
            service_action_key: new_key,
            spec_i_pt: !opts.spec_i_pt.is_empty(),
            all_tg_pt: opts.all_tg_pt,
            aptpl: opts.aptpl,
            transport_ids: opts.spec_i_pt.clone(),
        };
        self.pr_out(PrOutAction::Register, None, &params).await
    }

    /// REGISTER AND IGNORE EXISTING KEY: set this nexus' key to `new_key`
    /// whatever it was (0 unregisters). SPEC_I_PT is not allowed here.
    pub async fn register_and_ignore(&self, new_key: u64, opts: &RegisterOptions) -> Result<()> {
        if !opts.spec_i_pt.is_empty() {
            return Err(Error::InvalidArgument(
                "SPEC_I_PT is not allowed with REGISTER AND IGNORE EXISTING KEY".into(),
            ));
        }
        let params = PrOutParams {
            reservation_key: 0,
            service_action_key: new_key,
            all_tg_pt: opts.all_tg_pt,
            aptpl: opts.aptpl,
            ..PrOutParams::default()
        };
        self.pr_out(PrOutAction::RegisterAndIgnoreExistingKey, None, &params)
            .await
    }

    /// RESERVE with type `pr_type`, holding key `key`.
    pub async fn reserve(&self, key: u64, pr_type: PrType) -> Result<()> {
        self.pr_out(PrOutAction::Reserve, Some(pr_type), &key_only(key))
            .await
    }

    /// RELEASE the reservation of type `pr_type` held with `key`.
    pub async fn release(&self, key: u64, pr_type: PrType) -> Result<()> {
        self.pr_out(PrOutAction::Release, Some(pr_type), &key_only(key))
            .await
    }

    /// CLEAR every registration and the reservation.
    pub async fn clear(&self, key: u64) -> Result<()> {
        self.pr_out(PrOutAction::Clear, None, &key_only(key)).await
    }

    /// PREEMPT the registrations (and reservation) of `victim_key`.
    pub async fn preempt(&self, key: u64, victim_key: u64, pr_type: PrType) -> Result<()> {
        self.pr_out(
            PrOutAction::Preempt,
            Some(pr_type),
            &key_and_sa(key, victim_key),
        )
        .await
    }

    /// PREEMPT AND ABORT: preempt `victim_key` and abort its tasks.
    pub async fn preempt_and_abort(
        &self,
        key: u64,
        victim_key: u64,
        pr_type: PrType,
    ) -> Result<()> {
        self.pr_out(
            PrOutAction::PreemptAndAbort,
            Some(pr_type),
            &key_and_sa(key, victim_key),
        )
        .await
    }

    /// REGISTER AND MOVE: register `new_key` for `to` and move the
    /// reservation (of type `pr_type`) held with `key` there.
    pub async fn register_and_move(
        &self,
        key: u64,
        new_key: u64,
        pr_type: PrType,
        to: &MoveTarget,
    ) -> Result<()> {
        let params = RegisterMoveParams {
            reservation_key: key,
            service_action_key: new_key,
            unreg: to.unreg,
            aptpl: to.aptpl,
            relative_target_port: to.relative_target_port,
            transport_id: to.transport_id.clone(),
        };
        self.pr_out_raw(
            PrOutAction::RegisterAndMove,
            Some(pr_type),
            Bytes::from(params.encode()),
        )
        .await
    }

    /// REPLACE LOST RESERVATION (SPC-5): after the device server lost a
    /// reservation, re-establish it as type `pr_type` with `key` as the
    /// RESERVATION KEY and `new_key` as the SERVICE ACTION RESERVATION KEY.
    pub async fn replace_lost(&self, key: u64, new_key: u64, pr_type: PrType) -> Result<()> {
        self.pr_out(
            PrOutAction::ReplaceLostReservation,
            Some(pr_type),
            &key_and_sa(key, new_key),
        )
        .await
    }

    /// Run PERSISTENT RESERVE IN, retrying with a larger allocation length
    /// when `decode` reports the data was cut short.
    async fn pr_in<T>(
        &self,
        action: PrInAction,
        decode: impl Fn(&[u8]) -> std::result::Result<T, PrDataError>,
        what: &'static str,
    ) -> Result<T> {
        let mut alloc = FIRST_ALLOC;
        loop {
            let cdb = PrInCdb::new(action, alloc).encode();
            let r = self
                .execute(&Command::read(cdb.to_vec(), u32::from(alloc)))
                .await?;
            match decode(&r.data) {
                Ok(v) => return Ok(v),
                Err(PrDataError::Truncated { needed, available })
                    if available >= usize::from(alloc) && usize::from(alloc) < MAX_ALLOC =>
                {
                    alloc = needed.min(MAX_ALLOC) as u16;
                }
                Err(e) => {
                    return Err(Error::BadData {
                        what,
                        detail: e.to_string(),
                    })
                }
            }
        }
    }

    /// READ KEYS: the generation and every registered key.
    pub async fn read_keys(&self) -> Result<ReadKeys> {
        self.pr_in(PrInAction::ReadKeys, ReadKeys::decode, "READ KEYS data")
            .await
    }

    /// READ RESERVATION: the generation and the reservation, if any.
    pub async fn read_reservation(&self) -> Result<ReadReservation> {
        self.pr_in(
            PrInAction::ReadReservation,
            ReadReservation::decode,
            "READ RESERVATION data",
        )
        .await
    }

    /// REPORT CAPABILITIES.
    pub async fn report_capabilities(&self) -> Result<Capabilities> {
        self.pr_in(
            PrInAction::ReportCapabilities,
            Capabilities::decode,
            "REPORT CAPABILITIES data",
        )
        .await
    }

    /// READ FULL STATUS: every registration with its initiator port.
    pub async fn read_full_status(&self) -> Result<FullStatus> {
        self.pr_in(
            PrInAction::ReadFullStatus,
            FullStatus::decode,
            "READ FULL STATUS data",
        )
        .await
    }
}

fn key_only(key: u64) -> PrOutParams {
    PrOutParams {
        reservation_key: key,
        ..PrOutParams::default()
    }
}

fn key_and_sa(key: u64, sa: u64) -> PrOutParams {
    PrOutParams {
        reservation_key: key,
        service_action_key: sa,
        ..PrOutParams::default()
    }
}
