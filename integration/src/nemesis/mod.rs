//! Nemesis: randomized fault schedules against a local cluster under a recorded workload,
//! and a checker that says what was lost or seen that should not have been (issue 14, in
//! the spirit of Jepsen).
//!
//! [`schedule`] draws the faults from a seed (pure); [`run`] carries them out while a
//! workload runs through every region's proxy, recording a [`history`]; [`check`] judges
//! the history against the final state (pure), [`sessions`] the session guarantees
//! (read-your-writes, monotonic reads, causal token; pure); [`cluster`] is the cluster a
//! test runs them on. `integration/tests/nemesis.rs` is the short run of the test command;
//! `nemesis-bench` the long one with its summary table.

pub mod check;
pub mod cluster;
pub mod history;
pub mod run;
pub mod schedule;
pub mod sessions;
