//! The cluster a nemesis test runs on: its regions in synchronous mode with three etcd
//! members (as production runs; the etcd member faults need them) in a fresh temporary
//! directory, stopped after the scenario, and on failure the error with
//! every process's log tail printed and the directory (history, logs, data) kept for the
//! post-mortem.

use std::path::Path;

use meridian_launcher::{ClusterSpec, LocalCluster};
use meridian_shared::records::{ClusterConfig, SyncMode};

/// etcd members of a nemesis cluster.
pub const ETCD_MEMBERS: usize = 3;

/// Runs `scenario` on a synchronous cluster of `regions` whose directory is named
/// `meridian-{name}-...`; `log_lines`: how much of each log to print on failure.
pub async fn with_sync_cluster<F>(
    name: &str,
    regions: &[&str],
    log_lines: usize,
    scenario: F,
) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&mut LocalCluster, &Path) -> anyhow::Result<()>,
{
    let dir = tempfile::Builder::new()
        .prefix(&format!("meridian-{name}-"))
        .tempdir()?;
    let mut spec = ClusterSpec::new(dir.path(), regions);
    spec.etcd_members = ETCD_MEMBERS;
    spec.config = Some(ClusterConfig {
        sync_mode: SyncMode::On,
        ..ClusterConfig::default()
    });
    let mut cluster = LocalCluster::start(spec).await?;
    let result = scenario(&mut cluster, dir.path()).await;
    if let Err(e) = &result {
        eprintln!("{e:#}\n{}", cluster.log_tails(log_lines));
    }
    cluster.stop().await;
    if result.is_err() {
        eprintln!("{name}: kept {}", dir.keep().display());
    }
    result
}
