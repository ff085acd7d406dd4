//! Physical streaming replication: cloning a standby from a running primary
//! with `pg_basebackup`, and waiting until a standby has replayed a position.
//!
//! The clone does not use `pg_basebackup -R`: the standby settings
//! (`primary_conninfo`, `primary_slot_name`, `recovery_target_timeline =
//! 'latest'`) go into Meridian's own `meridian.conf`, so pointing a standby at a
//! new primary later rewrites one file Meridian owns instead of editing
//! `postgresql.auto.conf`. Limits: no archive (restore_command) and no
//! cascading set-up beyond what `from` names.

use std::time::Duration;

use meridian_shared::lsn::Lsn;
use tokio::time::Instant;

use super::config::{Conninfo, StandbyOf};
use super::{PgError, PgNode};

/// Clones `into` from the server `from` names: `pg_basebackup -X stream -c fast`
/// (with `-C -S slot` when a slot name is given: the slot is created on the
/// upstream as part of the backup), then writes `into`'s own settings and
/// HBA lines and `standby.signal`, so that [`PgNode::start`] brings it up as a
/// streaming standby of `from`. `into`'s data directory must not exist or be
/// empty.
pub async fn basebackup(from: &Conninfo, slot: Option<&str>, into: &PgNode) -> Result<(), PgError> {
    into.create_data_dir().await?;
    let fsync = into.settings().fsync;
    let mut upstream = from.clone();
    upstream.dbname = None;
    upstream.application_name = Some(into.name().to_owned());
    let mut cmd = into.command("pg_basebackup");
    cmd.arg("-D")
        .arg(into.data_dir())
        .arg("-d")
        .arg(upstream.to_string())
        .args(["-X", "stream", "-c", "fast", "--no-password", "--label"])
        .arg(format!("meridian clone of {}", into.name()));
    if let Some(slot) = slot {
        cmd.args(["-C", "-S", slot]);
    }
    if !fsync {
        cmd.arg("--no-sync");
    }
    into.run("pg_basebackup", cmd).await?;
    into.make_standby(StandbyOf {
        upstream,
        slot: slot.map(str::to_owned),
    })
    .await
}

/// Waits until `replica` has replayed `lsn` (`pg_last_wal_replay_lsn() >= lsn`),
/// up to `timeout`; returns the replayed position.
pub async fn wait_replay(replica: &PgNode, lsn: Lsn, timeout: Duration) -> Result<Lsn, PgError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match replica.replay_lsn().await {
            Ok(Some(replayed)) if replayed >= lsn => return Ok(replayed),
            Ok(Some(replayed)) => format!("replayed {replayed}"),
            Ok(None) => "not a standby (no replay position)".to_owned(),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(PgError::Timeout {
                what: format!("node {} to replay {lsn}", replica.name()),
                after: timeout,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Brings a data directory that did not shut down cleanly to a clean
/// shutdown state (pg_rewind's precondition): `postgres --single` with stdin
/// from /dev/null runs crash recovery, a shutdown checkpoint, and exits. A
/// clean directory is left alone. `standby.signal` must be gone (single-user
/// mode refuses standby mode). Retried a few times: right after a crash the
/// old postmaster's children may still hold its shared memory for a moment.
pub async fn crash_recover(node: &PgNode) -> Result<(), PgError> {
    let control = node.controldata().await?;
    if control.state.is_clean_shutdown() {
        return Ok(());
    }
    tracing::info!(node = %node.name(), state = ?control.state, "crash recovery (single-user mode)");
    let mut last = None;
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
        }
        let mut cmd = node.command("postgres");
        cmd.arg("--single")
            .arg("-D")
            .arg(node.data_dir())
            .arg("postgres");
        match tokio::time::timeout(Duration::from_secs(300), node.run("postgres --single", cmd))
            .await
        {
            Ok(Ok(_)) => {
                let after = node.controldata().await?;
                if after.state.is_clean_shutdown() {
                    return Ok(());
                }
                last = Some(PgError::Parse {
                    what: "pg_controldata after crash recovery",
                    detail: format!("state is {:?}", after.state),
                });
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                return Err(PgError::Timeout {
                    what: format!("crash recovery of node {}", node.name()),
                    after: Duration::from_secs(300),
                    last: "postgres --single still running".into(),
                })
            }
        }
    }
    Err(last.unwrap_or(PgError::Parse {
        what: "crash recovery",
        detail: "no attempt made".into(),
    }))
}

/// `pg_rewind` of the (stopped, cleanly shut down) data directory from the
/// running server `source` names (a conninfo with `dbname`). pg_rewind copies
/// the source's configuration files too: write the node's own configuration
/// afterwards (e.g. with [`PgNode::make_standby`]).
pub async fn rewind(node: &PgNode, source: &Conninfo) -> Result<(), PgError> {
    let mut cmd = node.command("pg_rewind");
    cmd.arg("-D")
        .arg(node.data_dir())
        .arg(format!("--source-server={source}"));
    if !node.settings().fsync {
        cmd.arg("--no-sync");
    }
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .map_err(|_| PgError::Timeout {
            what: format!("pg_rewind of node {}", node.name()),
            after: Duration::from_secs(600),
            last: String::new(),
        })?
        .map_err(|source| PgError::Io {
            context: "running pg_rewind".into(),
            source,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(PgError::CommandFailed {
            program: "pg_rewind".into(),
            status: out.status.to_string(),
            stderr: super::node::tail_lines(&text, 20),
        });
    }
    tracing::info!(node = %node.name(), output = %text.trim(), "pg_rewind done");
    Ok(())
}
