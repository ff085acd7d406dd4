//! Relays the invalidation horizon of the serving primary to every agent
//! (docs/cache.md, "Why a served entry is never stale"). Pure; the daemon sends
//! what [`HorizonRelay::on_heartbeat`] returns.
//!
//! The primary's agent reports in its heartbeats how far every change has been
//! applied in every region that is not unusable (`invalidated_lsn`: its slot's
//! confirmable position, which only moves on this coordinator's acks of
//! fanned-out batches). Each agent turns that horizon and its own node's
//! position into the region's freshness lease. Only a serving leader's
//! horizon is relayed, tagged with its epoch; within an epoch it only rises.
//! An agent is told each new value once, and the current one again after it
//! reconnects, so an idle cluster sends nothing.

use std::collections::BTreeMap;

use meridian_shared::envelope::CoordMsg;
use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;

/// What has been relayed, and to whom.
#[derive(Debug, Default)]
pub struct HorizonRelay {
    current: Option<(Epoch, Lsn)>,
    told: BTreeMap<String, (Epoch, Lsn)>,
}

impl HorizonRelay {
    /// A heartbeat of `from` carrying `lsn`. `leader`: the serving leader's
    /// node and epoch, if there is one. Returns the `Horizon` message for each
    /// of `connected` that has not been told the current value.
    pub fn on_heartbeat<'a>(
        &mut self,
        from: &str,
        lsn: Lsn,
        leader: Option<(&str, Epoch)>,
        connected: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(String, CoordMsg)> {
        let Some((node, epoch)) = leader else {
            return Vec::new();
        };
        if node != from {
            return Vec::new();
        }
        self.current = match self.current {
            Some((e, l)) if e == epoch => Some((e, l.max(lsn))),
            Some((e, l)) if e > epoch => Some((e, l)),
            _ => Some((epoch, lsn)),
        };
        let Some((epoch, lsn)) = self.current else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for n in connected {
            if self.told.get(n) != Some(&(epoch, lsn)) {
                self.told.insert(n.to_owned(), (epoch, lsn));
                out.push((n.to_owned(), CoordMsg::Horizon { lsn, epoch }));
            }
        }
        out
    }

    /// `node`'s session ended or was replaced: tell it again.
    pub fn forget(&mut self, node: &str) {
        self.told.remove(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(out: &[(String, CoordMsg)]) -> Vec<(&str, u64, u64)> {
        out.iter()
            .map(|(n, m)| match m {
                CoordMsg::Horizon { lsn, epoch } => (n.as_str(), lsn.0, epoch.0),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn only_the_serving_leaders_horizon_goes_to_every_agent_once() {
        let mut r = HorizonRelay::default();
        let all = ["a", "b", "c"];
        let leader = Some(("a", Epoch(2)));
        assert!(r.on_heartbeat("a", Lsn(10), None, all).is_empty());
        assert!(r.on_heartbeat("b", Lsn(10), leader, all).is_empty());
        assert_eq!(
            sent(&r.on_heartbeat("a", Lsn(10), leader, all)),
            [("a", 10, 2), ("b", 10, 2), ("c", 10, 2)]
        );
        assert!(
            r.on_heartbeat("a", Lsn(10), leader, all).is_empty(),
            "an idle cluster sends nothing"
        );
        assert!(
            r.on_heartbeat("a", Lsn(8), leader, all).is_empty(),
            "a lower value (a restarted stream) does not go back"
        );
        r.forget("b");
        assert_eq!(
            sent(&r.on_heartbeat("a", Lsn(10), leader, all)),
            [("b", 10, 2)]
        );
        assert_eq!(
            sent(&r.on_heartbeat("a", Lsn(12), leader, ["c"])),
            [("c", 12, 2)]
        );
    }

    #[test]
    fn a_new_epoch_replaces_the_horizon_and_an_old_one_is_ignored() {
        let mut r = HorizonRelay::default();
        let all = ["a", "b"];
        r.on_heartbeat("a", Lsn(100), Some(("a", Epoch(2))), all);
        assert_eq!(
            sent(&r.on_heartbeat("b", Lsn(40), Some(("b", Epoch(3))), all)),
            [("a", 40, 3), ("b", 40, 3)]
        );
        assert!(
            r.on_heartbeat("a", Lsn(500), Some(("a", Epoch(2))), all)
                .is_empty(),
            "a stale view of the old leader"
        );
    }
}
