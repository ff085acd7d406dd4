//! The Meridian test harness: real processes on loopback, driven from tests.
//!
//! - [`eventually`]: wait on a condition with a deadline (never a bare sleep).
//! - [`free_port`] / [`free_ports`]: fresh loopback ports per test.
//! - [`PgCluster`]: a PostgreSQL primary with streaming replicas in a temp
//!   dir, killed and removed on drop, logs printed when a test fails.
//!
//! Limits: everything runs on this host; PostgreSQL programs come from the
//! Debian packages that `integration/run-tests.sh` installs. etcd, Redis, the
//! WAN-link simulator and the multi-region launcher are not here yet.

pub mod pg_cluster;
pub mod ports;
pub mod wait;

pub use meridian_agent::postgres::{PgNode, StopMode};
pub use pg_cluster::{PgCluster, PgClusterBuilder};
pub use ports::{free_port, free_ports};
pub use wait::eventually;
