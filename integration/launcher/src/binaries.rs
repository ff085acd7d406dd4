//! Where the Meridian programs are: `MERIDIAN_BIN_DIR`, else the directory of the
//! running program (for a test binary in `target/debug/deps`, its parent).

use std::path::PathBuf;

use anyhow::Context;

/// The programs a local cluster runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub agent: PathBuf,
    pub coordinator: PathBuf,
    pub pgproxy: PathBuf,
    pub meridianctl: PathBuf,
}

impl Binaries {
    /// Finds all four, or says how to build them.
    pub fn locate() -> anyhow::Result<Binaries> {
        let dir = match std::env::var_os("MERIDIAN_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe = std::env::current_exe().context("locating the running program")?;
                let mut dir = exe
                    .parent()
                    .context("the running program has no directory")?
                    .to_path_buf();
                if dir.ends_with("deps") {
                    dir.pop();
                }
                dir
            }
        };
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            anyhow::ensure!(
                path.is_file(),
                "{} not found (set MERIDIAN_BIN_DIR, or build the programs with \
                 `cargo build --workspace --bins`)",
                path.display()
            );
            Ok(path)
        };
        Ok(Binaries {
            agent: find("meridian-agent")?,
            coordinator: find("meridian-coordinator")?,
            pgproxy: find("meridian-pgproxy")?,
            meridianctl: find("meridianctl")?,
        })
    }
}
