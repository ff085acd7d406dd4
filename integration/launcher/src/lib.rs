//! The local multi-region cluster: `meridianctl local up|down` and the end-to-end
//! tests start the same thing through this crate. It spawns real processes on
//! loopback with free ports (etcd, coordinators, one Postgres node with its agent
//! and one pgproxy per region), waits until the cluster serves, and writes
//! `DIR/cluster.json` ([`ClusterFile`]), the machine-readable description scripts
//! and `meridianctl --dir DIR` rely on.

pub mod cluster_file;

pub use cluster_file::{ClusterFile, CoordinatorEntry, NodeEntry, RegionEntry};

/// `meridianctl local …`
#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    #[command(subcommand)]
    pub cmd: LocalCmd,
}

/// The `local` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LocalCmd {
    /// Start a local multi-region cluster and run until SIGINT/SIGTERM.
    Up(UpArgs),
}

/// `meridianctl local up`
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Comma-separated region names; the first region's node starts as primary.
    #[arg(long, default_value = "us-east,us-west,eu-west", value_delimiter = ',')]
    pub regions: Vec<String>,
    /// Directory for data, logs, certificates and cluster.json (created if missing).
    #[arg(long)]
    pub dir: std::path::PathBuf,
}

/// Runs a `local` subcommand.
pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    match args.cmd {
        LocalCmd::Up(_) => anyhow::bail!("meridianctl local up: not built yet"),
    }
}
