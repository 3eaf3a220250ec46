//! The hook through which a clustered logical unit keeps its reservation
//! state in a store shared by several gateways (keyfence-target implements
//! it with keyfence-cluster and etcd; this crate stays free of any async
//! runtime and network client).
//!
//! In cluster mode the gate does not change its state itself. A command
//! that changes reservations hands the engine's transition to
//! [`SharedPrState::commit`], which applies it to the committed state
//! (perhaps several times, after conflicts) and returns once the change
//! is committed and every live gateway applied it. Gateways apply changes
//! through their followers: they [`Reservations::install`] the committed
//! state, establish its unit attentions for their own I_T nexuses and
//! abort the tasks the change aborts; the committing gateway does the same
//! through its own follower, so nothing is queued twice.
//!
//! [`Reservations::install`]: super::Reservations::install

use keyfence_pr::{Applied, PrState, Refusal};
use keyfence_scsi::sense::Asc;
use keyfence_scsi::Sense;

/// A transition of the shared state: the engine run on the committed
/// state. Must be a pure function of the state it is given: it may run
/// several times.
pub type SharedChange = Box<dyn FnMut(&PrState) -> Result<Applied, Refusal> + Send>;

/// A reservation state shared by the gateways of a cluster.
pub trait SharedPrState: Send + Sync + std::fmt::Debug {
    /// May this gateway execute commands on the LU now? Called for every
    /// command: must be a lock-free read. `false` while the gateway's
    /// lease is in doubt or lost.
    fn may_serve(&self) -> bool;

    /// Commit the change `change` computes from the committed state, and
    /// return the committed successor once every live gateway applied it
    /// (or provably stopped serving). Blocks: called on the threads that
    /// run PR OUT, never on an I/O worker. `Err(Refusal)` when the engine
    /// refused the command, or with the CHECK CONDITION to answer when the
    /// change could not be committed (or could not be confirmed applied).
    fn commit(&self, change: SharedChange) -> Result<PrState, Refusal>;

    /// Commit in the background, for callers that must not block (the
    /// effects of I_T nexus loss and resets). Failures are logged.
    fn commit_detached(&self, change: SharedChange);

    /// Establish `asc` for every I_T nexus of the LU on every gateway but
    /// this one (LOGICAL UNIT RESET: this gateway establishes it for its
    /// own nexuses at once). Default: nothing.
    fn unit_attention_elsewhere(&self, asc: Asc) {
        let _ = asc;
    }

    /// Does the shared state provide a cluster-wide lock for COMPARE AND
    /// WRITE ([`Self::lock_compare_and_write`])? Without one the LU does
    /// not offer COMPARE AND WRITE (it would not be atomic across
    /// gateways). Default: no.
    fn offers_compare_and_write(&self) -> bool {
        false
    }

    /// Take the LU's cluster-wide COMPARE AND WRITE lock for `blocks`
    /// blocks from `lba`: while this gateway holds it no other gateway
    /// runs a COMPARE AND WRITE on the LU, and every other live gateway
    /// holds back its commands that modify those blocks (it acknowledged
    /// the range after its writes in flight there finished, or it
    /// provably stopped serving). Blocks (not on an I/O worker). `Err` is
    /// the sense to answer (e.g. NOT READY, ASYMMETRIC ACCESS STATE
    /// TRANSITION when the lock cannot be had in time). Release it with
    /// [`Self::unlock_compare_and_write`] once the write is durable.
    fn lock_compare_and_write(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        let _ = (lba, blocks);
        Err(Sense::illegal_request(
            keyfence_scsi::sense::asc::INVALID_COMMAND_OPERATION_CODE,
        ))
    }

    /// Release the lock taken by a successful
    /// [`Self::lock_compare_and_write`].
    fn unlock_compare_and_write(&self) {}

    /// The name of this gateway, for the PR change log lines.
    fn gateway(&self) -> Option<&str> {
        None
    }
}
