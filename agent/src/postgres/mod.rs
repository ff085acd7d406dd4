//! Control of local PostgreSQL processes: the building blocks the agent uses to
//! supervise its node and the integration harness uses to start real clusters.
//!
//! - [`config`] and [`controldata`] are pure: they render `meridian.conf`,
//!   `pg_hba.conf` and conninfo strings, and parse `pg_controldata` output and
//!   `postmaster.pid`.
//! - [`PgBinaries`] finds the server programs, [`OsUser`] is the unprivileged
//!   user they run as (PostgreSQL refuses root).
//! - [`PgNode`] owns one data directory: `initdb`, start/stop/kill of the
//!   postmaster it spawned, readiness, promotion, LSNs, slots. A started
//!   postmaster is killed (SIGKILL, with its children, by pid) when its
//!   [`PgNode`] is dropped, so nothing leaks from a failed test.
//! - [`replication`] clones a standby with `pg_basebackup` and waits for replay.
//!
//! Limits: one postmaster per [`PgNode`]; only physical streaming replication;
//! `pg_rewind` and archive recovery are not wrapped yet. Connections for SQL
//! are short-lived tokio-postgres connections over TCP as the `postgres`
//! superuser, trusted from loopback by the generated `pg_hba.conf`.

pub mod binaries;
pub mod config;
pub mod controldata;
pub mod node;
pub mod osuser;
pub mod replication;

use std::time::Duration;

pub use binaries::PgBinaries;
pub use config::{Conninfo, PgSettings, StandbyOf};
pub use controldata::{ClusterState, ControlData, PostmasterPidFile};
pub use meridian_shared::lsn::{Lsn, LsnParseError};
pub use node::{PgNode, PgNodeSpec, StopMode};
pub use osuser::OsUser;
pub use replication::{basebackup, wait_replay};

/// Errors of PostgreSQL process control.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No directory with an executable `postgres` was found.
    #[error("PostgreSQL server programs not found (tried: {tried})")]
    BinariesNotFound {
        /// The directories looked at.
        tried: String,
    },
    /// The OS user PostgreSQL should run as does not exist (or is root).
    #[error("OS user {0:?} does not exist or cannot run PostgreSQL")]
    NoSuchUser(String),
    /// A file-system or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A PostgreSQL program exited unsuccessfully.
    #[error("{program} failed ({status}): {stderr}")]
    CommandFailed {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// A SQL command against the node failed (or the connection did).
    #[error("SQL on node {node}: {source}")]
    Sql {
        /// The node's name.
        node: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The postmaster exited while it was expected to run.
    #[error("postmaster of node {node} exited ({status}); log tail:\n{log_tail}")]
    Exited {
        /// The node's name.
        node: String,
        /// Its exit status.
        status: String,
        /// The last lines of its log.
        log_tail: String,
    },
    /// An operation needs a running postmaster and there is none.
    #[error("node {node} is not running")]
    NotRunning {
        /// The node's name.
        node: String,
    },
    /// `start` was called while a postmaster runs on the data directory.
    #[error("node {node} is already running (pid {pid})")]
    AlreadyRunning {
        /// The node's name.
        node: String,
        /// The running postmaster.
        pid: u32,
    },
    /// A wait ran out of time.
    #[error("timed out after {after:?} waiting for {what}; last: {last}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        after: Duration,
        /// The last error or observation.
        last: String,
    },
    /// `pg_promote` returned false (promotion did not finish within its wait).
    #[error("promotion of node {node} did not complete")]
    PromoteFailed {
        /// The node's name.
        node: String,
    },
    /// Sending a signal failed.
    #[error("sending {signal} to pid {pid}: {source}")]
    Signal {
        /// The signal name.
        signal: &'static str,
        /// The target.
        pid: i32,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// An LSN from PostgreSQL did not parse.
    #[error(transparent)]
    Lsn(#[from] LsnParseError),
    /// Text produced by PostgreSQL did not parse.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// Which text.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
}
