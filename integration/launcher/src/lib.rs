//! The local multi-region cluster: `meridianctl local up` and the end-to-end
//! tests start the same thing through this crate. It spawns real processes on
//! loopback with free ports (etcd, coordinators, one Postgres node with its agent,
//! one pgproxy and one Redis per region, userspace WAN links in front of every
//! node, one per region, delayed per region pair: [`wan::WanDelays`], and
//! delaying UDP relays for the agents' QUIC to the coordinators, which sit in
//! the first region),
//! waits until the cluster serves, and writes `DIR/cluster.json`
//! ([`ClusterFile`]), the machine-readable description scripts and
//! `meridianctl --dir DIR` rely on.
//!
//! Also here, because the launcher and the tests share them: [`wait::eventually`]
//! (deadline-bounded waiting) and [`ports`] (free loopback ports).

pub mod binaries;
pub mod cluster;
pub mod cluster_file;
pub mod etcd;
pub mod ports;
pub mod process;
pub mod redis_server;
pub mod wait;
pub mod wan;
pub mod wanlink;

use std::time::Duration;

pub use cluster::{connect, ClusterSpec, LocalCluster};
pub use cluster_file::{ClusterFile, CoordinatorEntry, NodeEntry, RegionEntry};
pub use wan::WanDelays;

/// `meridianctl local …`
#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    #[command(subcommand)]
    pub cmd: LocalCmd,
}

/// The `local` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LocalCmd {
    /// Start a local multi-region cluster on loopback and run until SIGINT/SIGTERM,
    /// then stop everything it started.
    Up(UpArgs),
}

/// `meridianctl local up`
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Comma-separated region names; the first region's node starts as primary.
    #[arg(long, default_value = "us-east,us-west,eu-west", value_delimiter = ',')]
    pub regions: Vec<String>,
    /// Directory for data, logs, certificates and cluster.json (created if missing;
    /// must not hold a previous cluster).
    #[arg(long)]
    pub dir: std::path::PathBuf,
    /// Cluster name (the etcd prefix is /meridian/<cluster>/).
    #[arg(long, default_value = "local")]
    pub cluster: String,
    /// Number of coordinators (one active, the others standing by).
    #[arg(long, default_value_t = 2)]
    pub coordinators: usize,
    /// One-way delays between regions, applied in each direction by userspace
    /// links in front of every node (this kernel has no netem), as comma-separated
    /// REGION:REGION=DELAY, e.g. us-east:eu-west=40ms,us-east:us-west=35ms.
    /// Symmetric; pairs not given and traffic within a region have none. The
    /// agents' QUIC traffic to the coordinators, which sit in the first region,
    /// is delayed the same way. Default: none.
    #[arg(long, value_name = "A:B=DELAY,...")]
    pub wan_delay: Option<String>,
    /// Start no Redis (by default one redis-server per region, given to the
    /// region's agent as --redis).
    #[arg(long)]
    pub no_redis: bool,
    /// etcd members (3 as production runs: one can be lost without losing the quorum).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=7))]
    pub etcd_members: u16,
}

/// Runs a `local` subcommand.
pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    match args.cmd {
        LocalCmd::Up(up) => run_up(up).await,
    }
}

async fn run_up(up: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !up.dir.join("cluster.json").exists(),
        "{} already holds a cluster (cluster.json exists); choose an empty --dir",
        up.dir.display()
    );
    let regions: Vec<&str> = up.regions.iter().map(String::as_str).collect();
    let mut spec = ClusterSpec::new(&up.dir, &regions);
    spec.cluster = up.cluster.clone();
    spec.coordinators = up.coordinators;
    spec.wan_delays = WanDelays::parse(up.wan_delay.as_deref().unwrap_or(""), &spec.regions)
        .map_err(|e| anyhow::anyhow!(e))?;
    spec.redis = !up.no_redis;
    spec.etcd_members = usize::from(up.etcd_members);
    eprintln!(
        "starting cluster {:?} in {} (logs in {}/logs)…",
        spec.cluster,
        up.dir.display(),
        up.dir.display()
    );
    let mut cluster = LocalCluster::start(spec).await?;
    println!("cluster {:?} is up", cluster.spec.cluster);
    for p in &cluster.proxies {
        println!("  {:<10} psql \"{}\"", p.region, p.dsn());
    }
    for r in &cluster.redis {
        println!("  {:<10} redis {}", r.region, r.url());
    }
    if cluster.spec.wan_delays.is_empty() {
        println!("  no WAN delay between regions");
    } else {
        println!(
            "  WAN delay (one-way, each direction): {} (coordinators in {})",
            cluster.spec.wan_delays,
            cluster.spec.coordinator_region()
        );
    }
    for n in &cluster.nodes {
        println!(
            "  node {:<12} ({}) postgres on 127.0.0.1:{} (superuser postgres, trust)",
            n.name, n.initial_role, n.pg_port
        );
    }
    println!(
        "  meridianctl --dir {} status     (cluster.json written there)",
        up.dir.display()
    );
    println!("Ctrl-C stops everything.");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping…");
    cluster.stop().await;
    let _ = std::fs::remove_file(up.dir.join("cluster.json"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    eprintln!("stopped");
    Ok(())
}
