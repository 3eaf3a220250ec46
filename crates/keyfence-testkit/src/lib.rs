//! The one test kit of the keyfence workspace. Integration tests of every
//! crate start their peers through it instead of keeping their own copies:
//!
//! * [`tool`]: external programs (tgtd, libiscsi's tools, sg_persist, ...).
//!   A missing tool **fails** the test with the package to install; no test
//!   passes by skipping its check.
//! * [`cmd`]: child processes run to completion with a time limit and their
//!   output captured.
//! * [`fdinfo`]: how a process holds a file open (cached or `O_DIRECT`).
//! * [`metrics`]: one scrape of a Prometheus endpoint, `promtool check`.
//! * [`port`]: the one place that hands out a port number up front (for
//!   tools such as tgtd that cannot bind port 0 and report it), retrying
//!   when the port turns out to be taken.
//! * [`tgtd`]: Debian's tgtd on loopback with one file-backed LUN, several
//!   side by side, each torn down by its own control port.
//! * [`serve`]: the `keyfence serve` process on `127.0.0.1:0` portals; the
//!   bound ports are read back from its start-up banner. The binary is the
//!   one cargo built for the running test profile.
//! * [`etcd`]: an N-member etcd cluster on loopback for the cluster tests,
//!   members killed or frozen by PID for fault tests.
//! * [`cluster`]: a cluster-mode rig (etcd, shared backing files, `keyfence
//!   serve` gateways), gateways stopped, killed or frozen for fault tests.
//! * [`raw`]: a blocking initiator speaking raw PDUs, for hostile and
//!   protocol-level tests.
//! * `server` (feature `server`): `keyfence_target::server::Server` in the
//!   test process, for tests that do not need a separate process.
//!
//! Everything listens on loopback only, and every wait is bounded.

pub mod cluster;
pub mod cmd;
pub mod etcd;
pub mod fdinfo;
pub mod metrics;
pub mod port;
pub mod raw;
pub mod serve;
#[cfg(feature = "server")]
pub mod server;
pub mod tgtd;
pub mod tool;

pub use cluster::{ClusterOptions, ClusterRig, Lease};
pub use cmd::{code, run, run_bounded, text};
pub use fdinfo::opened_direct;
/// The target crate the in-process server comes from, for its
/// configuration types (`Limits`, `ChapConfig`, ...).
#[cfg(feature = "server")]
pub use keyfence_target as target;
pub use raw::{LoginKeys, RawClient};
pub use serve::{keyfence_bin, Serve, ServeBuilder};
#[cfg(feature = "server")]
pub use server::{InProcessServer, ServerOptions};
pub use tgtd::{Tgtd, TgtdOptions};
pub use tool::require;
