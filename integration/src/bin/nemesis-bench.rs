//! The long nemesis run (issue 14): a local three-region cluster, many seeded fault
//! schedules under the recorded workload, then one markdown table per run: per fault
//! kind, how many were applied and the longest stretch without an acknowledged write
//! (p50, p99, max), and the checker's verdicts (lost, seen wrongly).
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/nemesis-bench --bin-dir target/release --schedules 20 --steps 3
//! ```
//!
//! `--seed` replays a run; the history (JSON lines) and every process's log stay in
//! `--dir`. Limits: everything runs on one host, with the launcher's userspace links.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use meridian_integration::nemesis::{run, schedule::Fault};
use meridian_launcher::{ClusterSpec, LocalCluster, WanDelays};
use meridian_shared::records::{ClusterConfig, SyncMode};

#[derive(Parser, Debug)]
#[command(about = "Random fault schedules against a local cluster, with a history checker")]
struct Args {
    #[command(flatten)]
    dirs: meridian_integration::bench::BenchDirs,
    /// Seed of the first schedule (the next ones take seed + 1, ...). Default: the clock.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 20)]
    schedules: u64,
    /// Faults per schedule.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// `on` (synchronous replication: nothing acknowledged may be lost) or `off`.
    #[arg(long, default_value = "on")]
    sync: String,
    /// Apply the demo's WAN delays (35/40/70 ms one way) between the regions.
    #[arg(long)]
    wan: bool,
    /// Draw only these kinds of fault (comma-separated; default: every kind).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<Fault>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = args.dirs.bin_dir.clone();
    meridian_integration::bench::main(bin_dir.as_deref(), bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    meridian_shared::telemetry::init();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let sync_mode = match args.sync.as_str() {
        "on" => SyncMode::On,
        "off" => SyncMode::Off,
        other => anyhow::bail!("--sync must be on or off, not {other:?}"),
    };
    let dir = args.dirs.work_dir("meridian-nemesis-")?;
    let regions = ["us-east", "us-west", "eu-west"];
    let mut spec = ClusterSpec::new(&dir, &regions);
    spec.etcd_members = meridian_integration::nemesis::cluster::ETCD_MEMBERS;
    spec.config = Some(ClusterConfig {
        sync_mode,
        ..ClusterConfig::default()
    });
    if args.wan {
        spec.wan_delays = WanDelays::none()
            .with("us-east", "us-west", Duration::from_millis(35))
            .with("us-east", "eu-west", Duration::from_millis(40))
            .with("us-west", "eu-west", Duration::from_millis(70));
    }
    let started = Instant::now();
    let mut cluster = LocalCluster::start(spec)
        .await
        .context("starting the cluster")?;
    let history = dir.join("history.jsonl");
    let result = run::run_seeds(
        &mut cluster,
        seed,
        args.schedules,
        args.steps,
        &args.faults,
        &history,
    )
    .await;
    cluster.stop().await;
    let report = result.with_context(|| format!("seed {seed}; logs in {}", dir.display()))?;
    let v = &report.verdicts;

    println!(
        "nemesis: seed {seed}, {} schedules x {} faults, sync {}, WAN {}, {:.0} s; history {}\n",
        args.schedules,
        args.steps,
        args.sync,
        if args.wan { "35/40/70 ms" } else { "none" },
        started.elapsed().as_secs_f64(),
        history.display()
    );
    let mut by_kind: BTreeMap<Fault, Vec<u64>> = BTreeMap::new();
    for (a, ms) in report.applied.iter().zip(&v.unavailable_ms) {
        by_kind.entry(a.step.fault).or_default().push(*ms);
    }
    println!("| fault | count | longest write gap p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|");
    for (fault, mut gaps) in by_kind {
        gaps.sort_unstable();
        let at = |q: f64| gaps[((q * gaps.len() as f64).ceil() as usize).clamp(1, gaps.len()) - 1];
        println!(
            "| {} | {} | {} ms | {} ms | {} ms |",
            fault.name(),
            gaps.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
    println!();
    println!("| verdict | value |");
    println!("|---|---:|");
    println!("| operations | {} |", report.history.len());
    println!("| inserts acknowledged | {} |", v.acked_inserts);
    println!(
        "| inserts indeterminate (08/57, timeout) | {} |",
        v.indeterminate_inserts
    );
    println!(
        "| epochs that acknowledged writes | {} |",
        v.acked_by_epoch.len()
    );
    println!(
        "| acknowledged inserts lost (of them in a failover) | {} ({}) |",
        v.lost.len(),
        v.lost_in_failover.len()
    );
    println!(
        "| reported failed, yet applied | {} |",
        v.failed_but_applied.len()
    );
    println!(
        "| acknowledged by a replaced primary | {} |",
        v.stale_epoch_acks.len()
    );
    println!(
        "| bank totals read / wrong | {} / {} |",
        v.total_reads,
        v.bad_totals.len()
    );
    println!(
        "| final bank total | {} (expected {}) |",
        v.final_total, v.expected_total
    );
    println!(
        "| transfers acknowledged / lost (of them in a failover) / reported failed, yet applied / phantom | {} / {} ({}) / {} / {} |",
        v.acked_transfers,
        v.lost_transfers.len(),
        v.lost_transfers_in_failover.len(),
        v.failed_transfers_applied.len(),
        v.phantom_transfers.len()
    );
    println!(
        "| accounts whose balance disagrees with the transfer ledger (double or partial transfer) | {} |",
        v.ledger_mismatches.len()
    );
    let s = &v.sessions;
    println!(
        "| register reads in the writing session / under a causal token | {} / {} |",
        s.reads, s.causal_reads
    );
    let stale = |list: &[meridian_integration::nemesis::sessions::Stale]| {
        let explained = list.iter().filter(|x| x.in_failover).count();
        format!("{} ({explained})", list.len())
    };
    println!(
        "| stale reads (of them across a failover): read-your-writes / monotonic / causal | {} / {} / {} |",
        stale(&s.read_your_writes),
        stale(&s.monotonic),
        stale(&s.causal)
    );
    let violations = v.violations(sync_mode != SyncMode::Off);
    if violations.is_empty() {
        println!("\nverdict: clean");
        Ok(())
    } else {
        anyhow::bail!("violations: {}", violations.join("; "))
    }
}
