#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The failsafe under an etcd outage (issue 14 §2), on a three-region cluster in
//! synchronous mode with the nemesis workload running through every region's proxy:
//!
//! 1. etcd frozen (SIGSTOP: every agent, proxy and coordinator loses it) for the lease
//!    TTL plus 6 s: the primary keeps its postmaster (no self-fence) and **every
//!    region's proxy** keeps acknowledging writes: no region goes a second without one;
//! 2. etcd frozen, then the primary partitioned: it fences itself (its postmaster
//!    gone) and nobody is promoted while etcd is away; etcd returns and a failover
//!    follows;
//! 3. etcd frozen, then the primary's postmaster killed: nobody is promoted until etcd
//!    returns, then a failover follows.
//!
//! The nemesis checker then finds nothing: no acknowledged insert lost, none
//! acknowledged by a primary after its successor served, bank totals intact.

use std::time::Duration;

use meridian_integration::nemesis::check::{longest_gap, Window};
use meridian_integration::nemesis::history::{Kind, Outcome};
use meridian_integration::nemesis::schedule::{Fault, Step};
use meridian_integration::nemesis::{cluster, run};
use meridian_launcher::LocalCluster;

const REGIONS: [&str; 3] = ["us-east", "us-west", "eu-west"];
/// Longest a region's proxy may go without an acknowledged write while etcd is away
/// and nothing else failed.
const MAX_REGION_GAP_MS: u64 = 1_000;

fn step(fault: Fault, hold_ms: u64) -> Step {
    Step {
        fault,
        quiet: Duration::from_secs(1),
        hold: Duration::from_millis(hold_ms),
        region: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_keeps_writes_going_and_a_fault_during_it_promotes_nobody() {
    meridian_shared::telemetry::init();
    cluster::with_sync_cluster("failsafe", &REGIONS, 80, async |c, dir| {
        scenario(c, dir).await
    })
    .await
    .unwrap();
}

async fn scenario(cluster: &mut LocalCluster, dir: &std::path::Path) -> anyhow::Result<()> {
    let path = dir.join("history.jsonl");
    let plan = vec![
        step(Fault::EtcdLost, 6_000),
        step(Fault::EtcdLostPartitionPrimary, 4_000),
        step(Fault::EtcdLostKillPrimary, 3_000),
    ];
    let report = run::run_plans(cluster, vec![(0, plan)], &path).await?;
    let verdicts = &report.verdicts;
    for (a, ms) in report.applied.iter().zip(&verdicts.unavailable_ms) {
        eprintln!(
            "failsafe: {:<30} of {:<10}: longest stretch without an acknowledged write {ms} ms",
            a.step.fault.name(),
            a.target
        );
    }
    anyhow::ensure!(report.applied.len() == 3, "not every fault was applied");

    // 1: through every region's proxy, writes went on while etcd was away.
    let outage = &report.applied[0];
    anyhow::ensure!(outage.step.fault == Fault::EtcdLost);
    let window = Window {
        start_ms: outage.window.start_ms,
        // The outage itself (lease TTL + hold); convergence after it is not the point.
        end_ms: outage.window.start_ms
            + (cluster.spec.lease_ttl + outage.step.hold).as_millis() as u64,
    };
    for region in REGIONS {
        let mut ends: Vec<u64> = report
            .history
            .iter()
            .filter(|op| op.client.starts_with(&format!("{region}/")))
            .filter(|op| matches!(op.kind, Kind::Insert { .. }))
            .filter(|op| matches!(op.outcome, Outcome::Ok { .. }))
            .map(|op| op.end_ms)
            .collect();
        ends.sort_unstable();
        let in_window = ends
            .iter()
            .filter(|e| **e > window.start_ms && **e <= window.end_ms)
            .count();
        let gap = longest_gap(&ends, window);
        eprintln!(
            "failsafe: {region}: {in_window} inserts acknowledged during the etcd outage, longest gap {gap} ms"
        );
        anyhow::ensure!(
            gap <= MAX_REGION_GAP_MS,
            "{region}: {gap} ms without an acknowledged write while etcd was away"
        );
    }

    // 2 and 3 each ended in a failover once etcd was back: three epochs acknowledged writes.
    anyhow::ensure!(
        verdicts.acked_by_epoch.len() >= 3,
        "epochs that acknowledged writes: {:?}",
        verdicts.acked_by_epoch
    );
    let violations = verdicts.violations(true);
    anyhow::ensure!(violations.is_empty(), "{}", violations.join("; "));
    Ok(())
}
