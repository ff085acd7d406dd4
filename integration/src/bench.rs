//! What the benchmark programs (`cache-bench`, `nemesis-bench`, `soak-bench`) share:
//! the options naming where the Meridian programs are and where a run's cluster goes,
//! and the start of `main` (the programs' directory handed to the launcher before any
//! thread exists, then a multi-threaded runtime).

use std::future::Future;
use std::path::{Path, PathBuf};

/// `--bin-dir` and `--dir`, flattened into each benchmark's own options.
#[derive(clap::Args, Debug)]
pub struct BenchDirs {
    /// Directory of meridian-agent, meridian-coordinator, meridian-pgproxy and meridianctl
    /// (default: this program's directory).
    #[arg(long, env = "MERIDIAN_BIN_DIR", value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Where the cluster, its logs and any history go (default: a new temporary
    /// directory, kept after the run).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl BenchDirs {
    /// The run's directory: `--dir` (created if missing) or a new kept temporary
    /// directory whose name starts with `prefix`.
    pub fn work_dir(&self, prefix: &str) -> anyhow::Result<PathBuf> {
        work_dir(self.dir.as_deref(), prefix)
    }
}

fn work_dir(dir: Option<&Path>, prefix: &str) -> anyhow::Result<PathBuf> {
    Ok(match dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.to_owned()
        }
        None => tempfile::Builder::new().prefix(prefix).tempdir()?.keep(),
    })
}

/// Runs a benchmark's async body: sets `MERIDIAN_BIN_DIR` from `bin_dir` (read by the
/// launcher's `Binaries::locate`; set here, before any thread exists), then blocks on
/// `body` in a multi-threaded runtime.
pub fn main<F>(bin_dir: Option<&Path>, body: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    if let Some(dir) = bin_dir {
        std::env::set_var("MERIDIAN_BIN_DIR", dir);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_dir_is_created_and_kept_and_a_temporary_one_is_new_and_kept() {
        let base = tempfile::tempdir().unwrap();
        let given = base.path().join("a/b");
        assert_eq!(work_dir(Some(&given), "x-").unwrap(), given);
        assert!(given.is_dir());
        let temp = work_dir(None, "meridian-bench-test-").unwrap();
        assert!(temp.is_dir(), "a temporary run directory outlives the call");
        assert!(temp
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("meridian-bench-test-"));
        std::fs::remove_dir(&temp).unwrap();
    }
}
