//! meridian-agent: the sidecar of one PostgreSQL node (see DESIGN.md §1, §3, §4).
//!
//! For now this crate holds [`postgres`], the control of local PostgreSQL
//! processes (initdb, start/stop/kill, promotion, cloning a standby, LSNs),
//! which the integration harness also uses to start real clusters. The
//! heartbeat client, lease holder, fencing and WAL decoding come later.

pub mod postgres;
