//! meridian-coordinator: the only decider of the cluster (DESIGN §1, §4).
//!
//! This crate currently holds the pure decision logic, free of I/O and of clocks
//! (time is passed in): the failure [`detector`], the failover [`planner`]
//! (candidate choice and the resumable failover state machine), the
//! synchronous-replication settings in [`sync`], the invalidation
//! [`fanout`] to every region's cache (issue 4) and the relay of the primary's
//! invalidation [`horizon`]. The I/O shell (etcd election and
//! records, QUIC sessions with the agents, the admin API) carries out what these
//! modules decide.

pub mod admin;
pub mod commands;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod detector;
pub mod fanout;
pub mod horizon;
pub mod http;
pub mod observe;
pub mod planner;
pub mod probe;
pub mod quic;
pub mod store;
pub mod sync;
