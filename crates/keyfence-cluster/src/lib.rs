//! keyfence cluster mode, storage side: several gateways serve one LU
//! and share its persistent-reservation state through etcd.
//!
//! This crate owns everything keyfence keeps in etcd and the protocols
//! over it (docs/cluster.md is the design):
//!
//! * [`Cluster::read`] / [`Cluster::commit`] / [`Cluster::update`]: one
//!   PR state per LU ([`LuState`]: the engine's state, whole, plus a
//!   bounded log of the unit attentions of recent changes), changed only
//!   by a transaction comparing the revision that was read;
//!   [`ClusterPrStore`] puts the synchronous [`keyfence_pr::PrStore`]
//!   trait on top.
//! * [`LuWatch`]: every committed state of an LU in revision order,
//!   resuming after reconnects, resynchronising after compaction.
//! * [`Gateway`]: membership and liveness: a lease kept alive in the
//!   background, `gateways/<name>` under it, and the local serving
//!   deadline ([`Gateway::may_serve`], [`Liveness`]) that ends before the
//!   lease can have expired at etcd.
//! * [`Gateway::ack`] / [`Cluster::wait_applied`]: acknowledgements that
//!   let a fencing PR OUT return GOOD only once every live gateway
//!   serving the LU applied it or provably stopped serving;
//!   [`Gateway::serve_lu`] / [`Gateway::leave_lu`]: which LUs a gateway
//!   serves (a reload adds and removes them).
//! * [`GatewayWatch`]: gateways joining and leaving, so survivors can
//!   commit a dead gateway's nexus-loss effects.
//! * [`Gateway::lock`] / [`Gateway::unlock`]: a cluster-wide lock per LU
//!   for COMPARE AND WRITE, bound to the holder's lease;
//!   [`Gateway::publish_range`] / [`Cluster::wait_range_acked`] /
//!   [`Cluster::watch_range`]: its LBA range held back on every gateway.
//! * [`ClusterConfig`]: the `[cluster]` table.
//!
//! The iSCSI/SCSI side (serving from a local snapshot, turning unit
//! attentions into sense data, ALUA states while fenced) is the target
//! server's.

mod client;
mod config;
mod error;
mod fence;
mod gateway;
mod keys;
mod lock;
mod pr_store;
mod range;
mod record;
mod status;
mod watch;

pub use client::{Change, Cluster, Committed, UpdateError, UPDATE_ATTEMPTS};
pub use config::{ClusterConfig, GatewayPortals, MAX_LEASE_TTL_SECS, MIN_LEASE_TTL_SECS};
pub use error::{Error, Unavailability};
pub use fence::Applied;
pub use gateway::{
    Gateway, GatewayEntry, GatewayRecord, Liveness, PortalGroup, GATEWAY_FORMAT, NOT_SERVING,
};
pub use keys::{check_gateway_name, Keys, LuId};
pub use lock::LockHeld;
pub use pr_store::ClusterPrStore;
pub use range::{CawRange, RangeEvent, RangeWatch, RANGE_FORMAT};
pub use record::{LuState, UaCatchUp, UnitAttention, FORMAT, UA_LOG_CHANGES, UA_LOG_ENTRIES};
pub use watch::{GatewayEvent, GatewayWatch, LuEvent, LuWatch};
