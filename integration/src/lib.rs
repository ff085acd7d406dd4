//! The Meridian test harness: real processes on loopback, driven from tests.
//!
//! - [`eventually`]: wait on a condition with a deadline (never a bare sleep).
//! - [`free_port`] / [`free_ports`]: fresh loopback ports per test.
//! - [`PgCluster`]: a PostgreSQL primary with streaming replicas in a temp
//!   dir, killed and removed on drop, logs printed when a test fails.
//!
//! - [`meridian_launcher::LocalCluster`]: the whole multi-region cluster as
//!   processes (etcd, coordinators, agents with their Postgres, proxies, WAN links).
//!
//! Limits: everything runs on this host; PostgreSQL programs come from the
//! Debian packages that `integration/run-tests.sh` installs.

pub mod bench;
pub mod containers;
pub mod etcd;
pub mod nemesis;
pub mod pg_cluster;
pub mod probe;

pub use meridian_launcher::{ports, wait};

pub use meridian_agent::postgres::{PgNode, StopMode};
pub use pg_cluster::{PgCluster, PgClusterBuilder};
pub use ports::{free_port, free_ports};
pub use wait::eventually;
