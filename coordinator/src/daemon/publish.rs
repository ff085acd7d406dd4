//! What the loop publishes to the admin API (`meridianctl status`, `events`):
//! cluster events, some rate-limited so that a condition that persists (no
//! candidate, a held suspicion, etcd unreachable) is not repeated every tick, and
//! the status snapshot, built by [`crate::observe::build_status`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meridian_shared::epoch::Epoch;
use meridian_shared::records::LeaderRecord;
use tracing::info;

use super::{unix_ms, Active, Shell};
use crate::control::{ClusterEvent, ClusterStatus};
use crate::detector::NodeReport;
use crate::observe::{self, StatusInput};
use crate::store::Snapshot;

/// Repeated events (no candidate, probe holds) are published at most this often.
const EVENT_REPEAT: Duration = Duration::from_secs(5);

impl Shell {
    /// Logs and publishes one cluster event.
    pub(super) fn event(&self, kind: &str, node: Option<&str>, epoch: Epoch, message: String) {
        info!(kind, node = node.unwrap_or(""), epoch = epoch.0, %message, "cluster event");
        let _ = self.control.events.send(ClusterEvent {
            at_ms: unix_ms(),
            kind: kind.to_string(),
            node: node.map(str::to_string),
            epoch: epoch.0,
            message,
        });
    }

    /// The status snapshot of `snap` with the agents' `reports`.
    pub(super) fn status(
        &self,
        snap: &Snapshot,
        active: bool,
        reports: &BTreeMap<String, NodeReport>,
        fenced: &BTreeSet<String>,
    ) -> ClusterStatus {
        observe::build_status(&StatusInput {
            cluster: &self.settings.cluster,
            coordinator: &self.settings.name,
            active,
            leader: snap.leader.as_ref().map(|l| &l.value),
            epoch: snap.epoch,
            config: &snap.config,
            sync: snap.sync.as_ref().map(|s| &s.value),
            members: &snap.members,
            proxies: &snap.proxies,
            reports,
            fenced,
            now: Instant::now(),
        })
    }
}

impl Active {
    /// Publishes an event unless one with the same `key` went out within [`EVENT_REPEAT`].
    pub(super) fn event_limited(
        &mut self,
        shell: &Shell,
        key: &str,
        kind: &str,
        node: Option<&str>,
        epoch: Epoch,
        message: String,
    ) {
        let now = Instant::now();
        if self
            .last_event
            .get(key)
            .is_some_and(|t| now.saturating_duration_since(*t) < EVENT_REPEAT)
        {
            return;
        }
        self.last_event.insert(key.to_string(), now);
        shell.event(kind, node, epoch, message);
    }

    /// `no_candidate` for replacing `leader` (rate-limited per leader).
    pub(super) fn no_candidate(&mut self, shell: &Shell, leader: &LeaderRecord, why: String) {
        let key = format!("nocand:{}", leader.node);
        self.event_limited(
            shell,
            &key,
            "no_candidate",
            Some(&leader.node),
            leader.epoch,
            why,
        );
    }

    /// The active coordinator's status, with the regions whose cache is unusable.
    pub(super) fn publish_status(&self, shell: &Shell) {
        let mut status = shell.status(&self.snap, true, self.detector.reports(), &self.fenced);
        status.cache_unusable = self
            .snap
            .cache_regions
            .iter()
            .filter(|(_, r)| !r.usable)
            .map(|(region, _)| region.clone())
            .collect();
        shell.control.status.send_replace(status);
    }
}
