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
