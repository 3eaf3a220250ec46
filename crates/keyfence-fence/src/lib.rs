//! keyfence-fence: multipath persistent reservations and I/O fencing over
//! iSCSI, as a library under the `keyfence` binary's `mpathpersist`,
//! `takeover` and `fence` commands.
//!
//! It owns:
//! - [`lun`]: the [`Lun`] trait (a logical unit that runs SCSI commands),
//!   its iSCSI implementation, and the PR IN/OUT commands built from
//!   keyfence-scsi's CDB types;
//! - [`multipath`]: PR over N paths to one logical unit (parallel REGISTER
//!   with rollback, dead-holder recovery after RELEASE, path failover);
//! - [`config`]: the multipath map configuration (TOML) and prkeys files;
//! - [`resolve`]: the one device resolver (URL or configured map) and its
//!   policy, used by every tool;
//! - [`session`]: which initiator port each fencing role logs in as;
//! - [`ops`]: the fencing operations (unfence, fence, own key, keys on
//!   every device, run on all devices with deadlines);
//! - [`failfast`]: take devices and poll them until ownership is lost;
//! - [`race`]: the coordinator-disk race of a split cluster;
//! - [`key`]: reservation keys derived exactly as fence_scsi derives them.
//!
//! Errors are one typed [`Error`]. Printing, exit statuses and argument
//! parsing stay in the binary.

pub mod config;
pub mod error;
pub mod failfast;
pub mod key;
pub mod lun;
pub mod multipath;
pub mod ops;
pub mod race;
pub mod resolve;
pub mod session;

pub use error::{Error, Result};
pub use lun::{IscsiLun, Lun, Target};
pub use multipath::Multipath;
pub use resolve::{resolve_devices, FenceDevice, Resolver};
pub use session::Role;

/// Format a key the way sg_persist prints it.
pub fn fmt_key(k: u64) -> String {
    format!("0x{k:x}")
}

/// CLOCK_MONOTONIC in nanoseconds: system-wide on Linux, so timestamps from
/// different processes compare.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always
    // available on Linux, so clock_gettime only writes into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    #[test]
    fn monotonic_moves_forward() {
        let a = super::monotonic_ns();
        let b = super::monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
