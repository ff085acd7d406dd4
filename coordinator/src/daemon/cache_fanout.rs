//! The I/O side of the invalidation fan-out (issue 4, [`crate::fanout`]): feeds it
//! the serving primary's change batches, the agents' acknowledgements and a
//! tick with the healthy connected agents of each region; carries out what it
//! returns (sends, acks to the primary, `cache_usable` / `cache_unusable`
//! events) and writes `cache/<region>` records, retrying a write that failed or
//! lost a race on the next tick. A new leader epoch starts a flush of every
//! region's cache.

use std::time::Instant;

use meridian_shared::cache_keys::CacheRegionRecord;
use meridian_shared::envelope::{AckResult, CoordMsg};
use meridian_shared::lsn::Lsn;
use meridian_shared::records::LeaderState;
use tracing::{debug, warn};

use super::{unix_ms, Active, Shell};
use crate::fanout::{self, Agents, Out as FanoutOut};
use crate::store;

impl Active {
    /// Healthy connected agents per region.
    fn agents(&self) -> Agents {
        let fresh = self.snap.config.suspect_after;
        fanout::agents_view(
            self.snap
                .members
                .iter()
                .map(|(n, m)| (n.as_str(), m.region.as_str())),
            self.detector
                .reports()
                .iter()
                .map(|(n, r)| (n.as_str(), r.heartbeat.region.as_str(), r.received_at)),
            |n| self.sessions.contains_key(n),
            Instant::now(),
            fresh,
        )
    }

    /// A change batch from `node`, taken only from the serving leader.
    pub(super) fn on_changes(
        &mut self,
        shell: &Shell,
        node: &str,
        batch_id: u64,
        tables: Vec<String>,
        commit_lsn: Lsn,
    ) {
        let Some(leader) = self.snap.leader.as_ref().map(|l| &l.value) else {
            return;
        };
        if leader.node != node || leader.state != LeaderState::Serving {
            debug!(
                node,
                batch_id, "changes from a node that is not the serving leader; ignored"
            );
            return;
        }
        let epoch = leader.epoch;
        let agents = self.agents();
        let batch = fanout::ChangesBatch {
            batch_id,
            tables,
            lsn: commit_lsn,
            epoch,
        };
        let outs = self.fanout.on_changes(node, batch, &agents, Instant::now());
        self.apply_fanout(shell, outs);
    }

    /// An acknowledgement of an invalidation the fan-out sent.
    pub(super) fn on_fanout_ack(
        &mut self,
        shell: &Shell,
        node: &str,
        id: u64,
        result: &AckResult,
        now: Instant,
    ) {
        let agents = self.agents();
        let outs = self.fanout.on_ack(node, id, result, &agents, now);
        self.apply_fanout(shell, outs);
    }

    fn apply_fanout(&mut self, shell: &Shell, outs: Vec<FanoutOut>) {
        let epoch = self.snap.current_epoch();
        for out in outs {
            match out {
                FanoutOut::Send { node, msg } => self.send(&node, msg),
                FanoutOut::AckPrimary { node, batch_id } => {
                    self.send(&node, CoordMsg::Ack { batch_id })
                }
                FanoutOut::MarkUnusable { region, reason } => {
                    shell.event(
                        "cache_unusable",
                        None,
                        epoch,
                        format!("region {region}: cache marked unusable: {reason}"),
                    );
                    self.cache_writes.push((region, false, reason));
                }
                FanoutOut::MarkUsable { region } => {
                    shell.event(
                        "cache_usable",
                        None,
                        epoch,
                        format!("region {region}: cache caught up and usable again"),
                    );
                    self.cache_writes.push((region, true, String::new()));
                }
            }
        }
    }

    pub(super) async fn fanout_tick(&mut self, shell: &mut Shell) {
        let now = Instant::now();
        if !self.cache_seeded {
            self.cache_seeded = true;
            for (region, rec) in &self.snap.cache_regions {
                if !rec.usable {
                    self.fanout.seed_unusable(region);
                }
            }
        }
        let agents = self.agents();
        let mut outs = self.fanout.tick(&agents, now);
        if let Some(leader) = self.snap.leader.as_ref().map(|l| &l.value) {
            if leader.state == LeaderState::Serving
                && self.fanout.flush_epoch().is_none_or(|e| e < leader.epoch)
            {
                outs.extend(self.fanout.start_flush(leader.epoch, &agents, now));
            }
        }
        self.apply_fanout(shell, outs);
        self.write_cache_regions(shell).await;
    }

    /// Writes the queued `cache/<region>` records; a failed one is queued again.
    async fn write_cache_regions(&mut self, shell: &mut Shell) {
        for (region, usable, reason) in std::mem::take(&mut self.cache_writes) {
            let record = CacheRegionRecord {
                usable,
                since: unix_ms(),
            };
            match store::write_cache_region(
                &mut shell.etcd,
                &shell.keys,
                &self.snap,
                &region,
                &record,
            )
            .await
            {
                Ok(true) => {
                    if !usable {
                        let outs = self.fanout.unusable_recorded(&region, Instant::now());
                        self.apply_fanout(shell, outs);
                    }
                }
                Ok(false) => {
                    self.snap_at = None;
                    self.cache_writes.push((region, usable, reason));
                }
                Err(e) => {
                    warn!(%region, error = %e, "cannot write the region's cache state");
                    self.cache_writes.push((region, usable, reason));
                }
            }
        }
    }
}
