//! Finding the PostgreSQL server programs (`postgres`, `initdb`,
//! `pg_basebackup`, `pg_controldata`, `pg_rewind`, ...).
//!
//! Debian keeps them in `/usr/lib/postgresql/<major>/bin`, off `PATH`, so the
//! directory comes from configuration, else from `pg_config --bindir`, else
//! from the Debian default for PostgreSQL 15. A directory counts only if it
//! holds an executable `postgres`. Discovery runs once at start-up and is
//! synchronous (one short `pg_config` call).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::PgError;

/// Where Debian's `postgresql-15` package installs the server programs.
pub const DEBIAN_PG15_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// The directory of the PostgreSQL server programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBinaries {
    bin_dir: PathBuf,
}

fn has_postgres(dir: &Path) -> bool {
    std::fs::metadata(dir.join("postgres"))
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

impl PgBinaries {
    /// Uses `bin_dir` when given (and fails if it has no `postgres`), else
    /// `pg_config --bindir`, else [`DEBIAN_PG15_BIN_DIR`].
    pub fn discover(bin_dir: Option<PathBuf>) -> Result<PgBinaries, PgError> {
        if let Some(dir) = bin_dir {
            return if has_postgres(&dir) {
                Ok(PgBinaries { bin_dir: dir })
            } else {
                Err(PgError::BinariesNotFound {
                    tried: dir.display().to_string(),
                })
            };
        }
        let mut tried = Vec::new();
        for dir in pg_config_bindir()
            .into_iter()
            .chain(std::iter::once(PathBuf::from(DEBIAN_PG15_BIN_DIR)))
        {
            if has_postgres(&dir) {
                return Ok(PgBinaries { bin_dir: dir });
            }
            tried.push(dir.display().to_string());
        }
        Err(PgError::BinariesNotFound {
            tried: tried.join(", "),
        })
    }

    /// Takes `bin_dir` as it is, without looking into it (for callers that
    /// validated it already, and for tests that never run a program).
    pub fn at(bin_dir: PathBuf) -> PgBinaries {
        PgBinaries { bin_dir }
    }

    /// The directory holding the programs.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The path of one program, e.g. `path("pgbench")`.
    pub fn path(&self, program: &str) -> PathBuf {
        self.bin_dir.join(program)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_dir_without_postgres_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = PgBinaries::discover(Some(dir.path().to_owned())).unwrap_err();
        assert!(matches!(err, PgError::BinariesNotFound { .. }), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn an_explicit_dir_with_an_executable_postgres_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("postgres");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        // Not executable yet: refused.
        assert!(PgBinaries::discover(Some(dir.path().to_owned())).is_err());
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bins = PgBinaries::discover(Some(dir.path().to_owned())).unwrap();
        assert_eq!(bins.bin_dir(), dir.path());
        assert_eq!(bins.path("initdb"), dir.path().join("initdb"));
    }
}
