//! The unprivileged OS user PostgreSQL runs as.
//!
//! PostgreSQL refuses to run as root. When Meridian runs as root, every
//! PostgreSQL program is started as this user through the safe
//! `Command::uid`/`gid` API (std drops the supplementary groups too), and the
//! data directories are chowned to it. When Meridian is not root it cannot
//! switch users, so the programs simply run as the current user. Creating the
//! user (`useradd --system`) is possible only as root.

use std::path::Path;

use nix::unistd::{Uid, User};

use super::PgError;

/// The OS identity PostgreSQL programs run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OsUser {
    name: String,
    /// `Some((uid, gid))` when children must switch to it (we are root).
    switch_to: Option<(u32, u32)>,
}

impl OsUser {
    /// The user this process runs as; no switching.
    pub fn current() -> OsUser {
        let uid = Uid::effective();
        let name = User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        OsUser {
            name,
            switch_to: None,
        }
    }

    /// The user `name` when running as root; the current user otherwise
    /// (a non-root process cannot switch, and PostgreSQL accepts any non-root user).
    pub fn lookup(name: &str) -> Result<OsUser, PgError> {
        if !Uid::effective().is_root() {
            return Ok(OsUser::current());
        }
        let user = User::from_name(name)
            .map_err(|e| PgError::Io {
                context: format!("looking up OS user {name:?}"),
                source: std::io::Error::from(e),
            })?
            .ok_or_else(|| PgError::NoSuchUser(name.to_owned()))?;
        if user.uid.is_root() {
            return Err(PgError::NoSuchUser(format!(
                "{name} (uid 0: PostgreSQL refuses to run as root)"
            )));
        }
        Ok(OsUser {
            name: user.name,
            switch_to: Some((user.uid.as_raw(), user.gid.as_raw())),
        })
    }

    /// Like [`OsUser::lookup`], creating the user with `useradd --system` when
    /// it is missing and we are root. Safe against a concurrent creation.
    pub async fn ensure(name: &str) -> Result<OsUser, PgError> {
        match OsUser::lookup(name) {
            Err(PgError::NoSuchUser(_)) => {}
            other => return other,
        }
        let out = tokio::process::Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .output()
            .await
            .map_err(|source| PgError::Io {
                context: "running useradd".into(),
                source,
            })?;
        // Another process may have created it meanwhile: look again either way.
        OsUser::lookup(name).map_err(|e| match e {
            PgError::NoSuchUser(_) => PgError::CommandFailed {
                program: "useradd".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            },
            other => other,
        })
    }

    /// The user's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(uid, gid)` children switch to, or `None` when they keep ours.
    pub fn ids(&self) -> Option<(u32, u32)> {
        self.switch_to
    }

    /// Makes `cmd` run as this user.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        if let Some((uid, gid)) = self.switch_to {
            cmd.uid(uid).gid(gid);
        }
    }

    /// Gives `path` to this user (no-op when not switching).
    pub fn chown(&self, path: &Path) -> Result<(), PgError> {
        if let Some((uid, gid)) = self.switch_to {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| PgError::Io {
                context: format!("chown {} to {}", path.display(), self.name),
                source,
            })?;
        }
        Ok(())
    }

    /// Whether a file owned by `uid` belongs to this user.
    pub fn owns(&self, uid: u32) -> bool {
        match self.switch_to {
            Some((u, _)) => u == uid,
            None => Uid::effective().as_raw() == uid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_user_never_switches() {
        let me = OsUser::current();
        assert_eq!(me.ids(), None);
        assert!(me.owns(Uid::effective().as_raw()));
        assert!(!me.name().is_empty());
    }

    #[test]
    fn lookup_of_a_missing_user_fails_as_root_only() {
        let r = OsUser::lookup("meridian-no-such-user-x");
        if Uid::effective().is_root() {
            assert!(matches!(r, Err(PgError::NoSuchUser(_))), "{r:?}");
        } else {
            assert_eq!(r.unwrap(), OsUser::current());
        }
    }

    #[test]
    fn root_is_never_a_postgres_user() {
        if Uid::effective().is_root() {
            assert!(matches!(
                OsUser::lookup("root"),
                Err(PgError::NoSuchUser(_))
            ));
        }
    }
}
