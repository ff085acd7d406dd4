//! Keeping the primary's synchronous standby set (sync mode, [`crate::sync`]):
//! each steady-state tick asks [`observe::sync_change`] for the next change and
//! carries it out, either a `sync` record written by etcd transaction or
//! `SetSyncStandbys` sent to the primary. What the primary applied is learnt from
//! its acknowledgement, with its WAL position at that moment (a standby removed
//! from the record must first have caught up with it).

use std::collections::BTreeSet;
use std::time::Instant;

use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;
use meridian_shared::records::{LeaderRecord, SyncRecord};
use tracing::debug;

use super::term::committed;
use super::{Active, Shell};
use crate::commands::CommandSpec;
use crate::observe::{self, SyncChange, SyncInput};
use crate::store;

/// The synchronous set applied on the current primary, as far as this coordinator knows.
#[derive(Clone, Debug)]
pub(super) struct SyncApplied {
    leader: String,
    epoch: Epoch,
    standbys: BTreeSet<String>,
    /// The primary's position when the setting was acknowledged.
    at_lsn: Lsn,
}

impl Active {
    /// One step towards the desired synchronous set of `leader`.
    pub(super) async fn manage_sync(&mut self, shell: &mut Shell, leader: &LeaderRecord) {
        let applied = self
            .sync_applied
            .as_ref()
            .filter(|a| a.leader == leader.node && a.epoch == leader.epoch)
            .map(|a| (&a.standbys, a.at_lsn));
        let change = observe::sync_change(&SyncInput {
            leader,
            members: &self.snap.members,
            reports: self.detector.reports(),
            config: &self.snap.config,
            record: self.snap.sync.as_ref().map(|s| &s.value),
            applied,
            now: Instant::now(),
        });
        match change {
            None => {}
            Some(SyncChange::Apply { standbys, value }) => {
                self.sync_values.insert(value.clone(), standbys);
                let spec = CommandSpec::SetSyncStandbys {
                    value,
                    epoch: leader.epoch,
                };
                self.ensure(&leader.node, spec);
            }
            Some(SyncChange::Record(standbys)) => {
                let record = SyncRecord {
                    leader: leader.node.clone(),
                    epoch: leader.epoch,
                    standbys,
                };
                let outcome =
                    store::write_sync(&mut shell.etcd, &shell.keys, &self.snap, &record).await;
                if committed("sync", outcome) {
                    debug!(?record, "sync record written");
                }
                self.refresh(shell).await;
            }
        }
    }

    /// The primary `node` acknowledged `SetSyncStandbys { value }` in `epoch`.
    pub(super) fn sync_standbys_acked(&mut self, node: &str, value: &str, epoch: Epoch) {
        let Some(leader) = self.snap.leader.as_ref().map(|l| &l.value) else {
            return;
        };
        if leader.node != node {
            return;
        }
        let standbys = self.sync_values.get(value).cloned().unwrap_or_default();
        let at_lsn = self
            .primary_positions
            .get(node)
            .copied()
            .unwrap_or(Lsn::ZERO);
        self.sync_applied = Some(SyncApplied {
            leader: node.to_string(),
            epoch,
            standbys,
            at_lsn,
        });
    }
}
