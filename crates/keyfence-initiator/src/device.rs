//! A [`Device`]: one logical unit reached through one iSCSI session, with
//! typed SCSI calls. Persistent-reservation calls are in [`crate::pr`].

use std::sync::Mutex;

use bytes::Bytes;
use keyfence_scsi::{Sense, SenseKey};
use tokio::sync::OnceCell;

use crate::commands::{self, Capacity, Command, Designator, StandardInquiry};
use crate::config::SessionConfig;
use crate::error::{Error, Result};
use crate::login;
use crate::session::{ScsiResult, Session};
use crate::url::IscsiUrl;

/// Most UNIT ATTENTIONs one command may be retried through: a target
/// queues at most a handful per I_T nexus, so more means something is wrong.
pub const MAX_UNIT_ATTENTION_RETRIES: u32 = 16;

/// BUSY / TASK SET FULL retries per command (about 4 s of backoff in all).
pub const MAX_BUSY_RETRIES: u32 = 12;

/// One LUN of one target, over a logged-in session.
pub struct Device {
    session: Session,
    url: IscsiUrl,
    lun: u16,
    config: SessionConfig,
    capacity: OnceCell<Capacity>,
    /// UNIT ATTENTION conditions consumed by automatic retries.
    unit_attentions: Mutex<Vec<Sense>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("url", &self.url.to_string())
            .field("session", &self.session)
            .finish()
    }
}

impl Device {
    /// Log in to the target and LUN named by `url` (which must include
    /// both).
    pub async fn connect(url: &IscsiUrl, config: &SessionConfig) -> Result<Device> {
        let lun = url.lun()?;
        let session = login::connect(url, config).await?;
        Ok(Device {
            session,
            url: url.clone(),
            lun,
            config: config.clone(),
            capacity: OnceCell::new(),
            unit_attentions: Mutex::new(Vec::new()),
        })
    }

    /// Use an existing session for another LUN of the same target.
    pub fn on_session(
        session: Session,
        url: &IscsiUrl,
        lun: u16,
        config: &SessionConfig,
    ) -> Device {
        Device {
            session,
            url: url.clone(),
            lun,
            config: config.clone(),
            capacity: OnceCell::new(),
            unit_attentions: Mutex::new(Vec::new()),
        }
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn url(&self) -> &IscsiUrl {
        &self.url
    }

    pub fn lun(&self) -> u16 {
        self.lun
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Log in again with the same initiator port (same name and ISID), so
    /// the target sees the same I_T nexus and reinstates the session.
    pub async fn reconnect(&mut self) -> Result<()> {
        let old = std::mem::replace(
            &mut self.session,
            login::connect(&self.url, &self.config).await?,
        );
        drop(old);
        Ok(())
    }

    /// Log out and close the connection.
    pub async fn close(self) -> Result<()> {
        self.session.logout().await
    }

    /// UNIT ATTENTIONs that automatic retries consumed since the last call.
    pub fn take_unit_attentions(&self) -> Vec<Sense> {
        std::mem::take(
            &mut *self
                .unit_attentions
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Run a command; non-GOOD status becomes an [`Error`]. UNIT ATTENTION
    /// is retried up to `config.unit_attention_retries` times (each one is
    /// recorded, see [`Device::take_unit_attentions`]).
    pub async fn execute(&self, cmd: &Command) -> Result<ScsiResult> {
        self.execute_retry_ua(cmd, self.config.unit_attention_retries)
            .await
    }

    /// Run a command and return the status as received, without mapping.
    pub async fn execute_raw(&self, cmd: &Command) -> Result<ScsiResult> {
        self.session.execute(self.lun, cmd).await
    }

    /// Run a command, retrying through up to `retries` UNIT ATTENTIONs and
    /// up to [`MAX_BUSY_RETRIES`] BUSY / TASK SET FULL statuses (with
    /// exponential backoff). Both mean the command was not executed.
    pub async fn execute_retry_ua(&self, cmd: &Command, retries: u32) -> Result<ScsiResult> {
        let retries = retries.min(MAX_UNIT_ATTENTION_RETRIES);
        let (mut ua, mut busy) = (0, 0);
        let mut backoff = std::time::Duration::from_millis(2);
        loop {
            match self.session.execute(self.lun, cmd).await?.into_result() {
                Err(Error::UnitAttention(s)) if ua < retries => {
                    tracing::info!(asc = s.asc, ascq = s.ascq, "UNIT ATTENTION; retrying");
                    self.unit_attentions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(s);
                    ua += 1;
                }
                Err(Error::Status(st @ (0x08 | 0x28))) if busy < MAX_BUSY_RETRIES => {
                    tracing::debug!(status = st, ?backoff, "target busy; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_millis(500));
                    busy += 1;
                }
                r => return r,
            }
        }
    }

    /// Issue TEST UNIT READY until no UNIT ATTENTION is pending (bounded)
    /// and return the conditions that were reported.
    pub async fn clear_unit_attentions(&self) -> Result<Vec<Sense>> {
        let mut seen = Vec::new();
        for _ in 0..MAX_UNIT_ATTENTION_RETRIES {
            let r = self.execute_raw(&commands::test_unit_ready()).await?;
            match r.sense {
                Some(s) if r.status == 0x02 && s.key == SenseKey::UnitAttention => seen.push(s),
                _ => return Ok(seen),
            }
        }
        Ok(seen)
    }

    pub async fn test_unit_ready(&self) -> Result<()> {
        self.execute(&commands::test_unit_ready()).await.map(drop)
    }

    /// Standard INQUIRY data.
    pub async fn inquiry(&self) -> Result<StandardInquiry> {
        let r = self.execute(&commands::inquiry(None, 96)).await?;
        commands::decode_standard_inquiry(&r.data)
    }

    /// A VPD page, complete (the allocation length grows to the page length).
    pub async fn vpd_page(&self, page: u8) -> Result<Bytes> {
        let mut alloc: u16 = 255;
        loop {
            let r = self.execute(&commands::inquiry(Some(page), alloc)).await?;
            let d = r.data;
            if d.len() < 4 {
                return Err(Error::BadData {
                    what: "VPD page",
                    detail: format!("page 0x{page:02x}: {} bytes", d.len()),
                });
            }
            let need = 4 + usize::from(u16::from_be_bytes([d[2], d[3]]));
            if need <= d.len() || alloc == u16::MAX || d.len() < usize::from(alloc) {
                return Ok(d);
            }
            alloc = need.min(usize::from(u16::MAX)) as u16;
        }
    }

    /// VPD page 83h designators.
    pub async fn device_identification(&self) -> Result<Vec<Designator>> {
        let d = self.vpd_page(0x83).await?;
        commands::decode_device_identification(&d)
    }

    /// READ CAPACITY(16) (fresh; also refreshes the cached block size).
    pub async fn read_capacity16(&self) -> Result<Capacity> {
        let r = self.execute(&commands::read_capacity16()).await?;
        commands::decode_read_capacity16(&r.data)
    }

    /// Capacity as first read (cached for block-size computations).
    pub async fn capacity(&self) -> Result<Capacity> {
        self.capacity
            .get_or_try_init(|| self.read_capacity16())
            .await
            .copied()
    }

    /// REPORT LUNS: the single-level LUN numbers.
    pub async fn report_luns(&self) -> Result<Vec<u16>> {
        let mut alloc = 256u32;
        loop {
            let r = self.execute(&commands::report_luns(alloc)).await?;
            match commands::report_luns_needed(&r.data) {
                Some(need) if need > alloc && alloc < 1 << 20 => alloc = need.min(1 << 20),
                _ => {
                    return Ok(commands::decode_report_luns(&r.data)?
                        .into_iter()
                        .filter_map(|l| keyfence_iscsi::Lun(l).number())
                        .collect())
                }
            }
        }
    }

    /// READ(16) of `blocks` logical blocks at `lba`.
    pub async fn read(&self, lba: u64, blocks: u32) -> Result<Bytes> {
        let bs = self.capacity().await?.block_size;
        let r = self.execute(&commands::read16(lba, blocks, bs)?).await?;
        Ok(r.data)
    }

    /// WRITE(16) of `data` (whole blocks) at `lba`.
    pub async fn write(&self, lba: u64, data: Bytes) -> Result<()> {
        let bs = self.capacity().await?.block_size;
        self.execute(&commands::write16(lba, data, bs, false)?)
            .await
            .map(drop)
    }

    /// SYNCHRONIZE CACHE of the whole LU.
    pub async fn synchronize_cache(&self) -> Result<()> {
        self.execute(&commands::synchronize_cache()).await.map(drop)
    }
}
