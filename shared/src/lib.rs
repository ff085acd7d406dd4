//! Types and codecs every Meridian part agrees on: the configuration schema, the
//! topology and leader records, LSNs and epochs, the etcd key layout, the QUIC
//! message envelope, and the telemetry setup. Nothing in this crate opens a socket.

pub mod cache_keys;
pub mod config;
pub mod envelope;
pub mod epoch;
pub mod failsafe;
pub mod flag_file;
pub mod keys;
pub mod lsn;
pub mod pki;
pub mod records;
pub mod telemetry;
