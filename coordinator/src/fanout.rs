//! Pure fan-out of invalidation batches to every region (DESIGN.md §6), time
//! passed in; the daemon carries out the [`Out`]puts.
//!
//! A `Changes` batch from the primary's agent becomes one `Invalidate` per
//! region, sent to one healthy agent there: the region's preferred agent (the
//! last one that acked) when healthy, else the first healthy one by name. An
//! agent that does not ack `Ok` within `ack_timeout` (or acks `Failed`/`Stale`)
//! is replaced by another healthy agent of the region not tried yet for that
//! batch. A region with no agent left is marked unusable ([`Out::MarkUnusable`],
//! the daemon writes etcd `cache/<region>` and confirms with
//! [`Fanout::unusable_recorded`]); from then on it counts as done for every
//! batch, and the tables it missed are remembered. The primary's agent gets
//! `Ack { batch_id }` ([`Out::AckPrimary`]) once every region acked or is
//! recorded unusable. An unusable region recovers when one of its agents acks a
//! catch-up `Invalidate` of every table it missed at the latest LSN seen (which
//! makes every entry read before that invalid), tried at most every
//! `recovery_every`; then [`Out::MarkUsable`]. A region that was marked
//! unusable before this coordinator took over (missed set unknown) stays so.
//!
//! After a new leader epoch, [`Fanout::start_flush`] sends `FlushCache` to
//! every region; a region's `Invalidate`s of that epoch wait until its flush is
//! acked (retried like invalidations; a region without agents is marked
//! unusable and skips it). Every command is idempotent on the agent, so
//! re-sending is always safe.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meridian_shared::envelope::{AckResult, CommandId, CoordMsg};
use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;

/// Fan-out timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutConfig {
    /// An agent that has not acked within this is replaced (default 1 s).
    pub ack_timeout: Duration,
    /// Catch-up attempts for an unusable region at most this often (default 1 s).
    pub recovery_every: Duration,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            ack_timeout: Duration::from_secs(1),
            recovery_every: Duration::from_secs(1),
        }
    }
}

/// One `Changes` batch as received, with the leader epoch it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangesBatch {
    pub batch_id: u64,
    pub tables: Vec<String>,
    pub lsn: Lsn,
    pub epoch: Epoch,
}

/// What the daemon must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Send `msg` to `node`'s agent.
    Send { node: String, msg: CoordMsg },
    /// Send `CoordMsg::Ack { batch_id }` to the primary's agent `node`.
    AckPrimary { node: String, batch_id: u64 },
    /// Write `cache/<region>` = `{"usable": false, ...}`, then call
    /// [`Fanout::unusable_recorded`].
    MarkUnusable { region: String, reason: String },
    /// Write `cache/<region>` = `{"usable": true, ...}` (or delete it).
    MarkUsable { region: String },
}

/// Healthy agents per region: every region of the cluster as a key (regions
/// without a healthy agent map to an empty list).
pub type Agents = BTreeMap<String, Vec<String>>;

/// The [`Agents`] view: every region named by a member record or a
/// heartbeat, each with its agents that are connected (`connected(node)`) and
/// whose last heartbeat arrived within `fresh` of `now`, sorted by name.
pub fn agents_view<'a>(
    member_regions: impl IntoIterator<Item = (&'a str, &'a str)>,
    reports: impl IntoIterator<Item = (&'a str, &'a str, Instant)>,
    connected: impl Fn(&str) -> bool,
    now: Instant,
    fresh: Duration,
) -> Agents {
    let mut view: Agents = BTreeMap::new();
    for (_, region) in member_regions {
        view.entry(region.to_owned()).or_default();
    }
    for (node, region, received_at) in reports {
        let list = view.entry(region.to_owned()).or_default();
        if connected(node) && now.saturating_duration_since(received_at) < fresh {
            list.push(node.to_owned());
        }
    }
    for list in view.values_mut() {
        list.sort();
        list.dedup();
    }
    view
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Delivery {
    /// Waiting for the region's `FlushCache` of this epoch.
    Waiting,
    Sending {
        node: String,
        id: CommandId,
        sent_at: Instant,
        tried: BTreeSet<String>,
    },
    Acked,
    /// The region is unusable; done once that is recorded.
    Unusable,
}

#[derive(Debug)]
struct BatchRun {
    from: String,
    batch_id: u64,
    tables: Vec<String>,
    lsn: Lsn,
    epoch: Epoch,
    regions: BTreeMap<String, Delivery>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RegionHealth {
    Usable,
    Unusable {
        recorded: bool,
        /// `None` when unknown (marked by an earlier coordinator).
        missed: Option<BTreeSet<String>>,
        attempt: Option<(String, CommandId, Instant)>,
        last_attempt: Option<Instant>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FlushState {
    Sending {
        node: String,
        id: CommandId,
        sent_at: Instant,
        tried: BTreeSet<String>,
    },
    Done,
}

/// The fan-out state of one active coordinator term.
#[derive(Debug)]
pub struct Fanout {
    cfg: FanoutConfig,
    next_id: CommandId,
    batches: Vec<BatchRun>,
    preferred: BTreeMap<String, String>,
    health: BTreeMap<String, RegionHealth>,
    flush_epoch: Option<Epoch>,
    flush: BTreeMap<String, FlushState>,
    last_lsn: Lsn,
    last_epoch: Epoch,
}

impl Fanout {
    /// Command ids start at `first_id` (keep them apart from other commands').
    pub fn new(cfg: FanoutConfig, first_id: CommandId) -> Self {
        Fanout {
            cfg,
            next_id: first_id,
            batches: Vec::new(),
            preferred: BTreeMap::new(),
            health: BTreeMap::new(),
            flush_epoch: None,
            flush: BTreeMap::new(),
            last_lsn: Lsn::ZERO,
            last_epoch: Epoch::ZERO,
        }
    }

    /// Regions an earlier coordinator marked unusable (etcd `cache/<region>`):
    /// they stay unusable, since what they missed is unknown.
    pub fn seed_unusable(&mut self, region: &str) {
        self.health
            .entry(region.to_owned())
            .or_insert(RegionHealth::Unusable {
                recorded: true,
                missed: None,
                attempt: None,
                last_attempt: None,
            });
    }

    /// The epoch whose `FlushCache` was started last.
    pub fn flush_epoch(&self) -> Option<Epoch> {
        self.flush_epoch
    }

    /// Whether `region` is currently unusable.
    pub fn is_unusable(&self, region: &str) -> bool {
        matches!(self.health.get(region), Some(RegionHealth::Unusable { .. }))
    }

    /// Batches not yet acked to the primary.
    pub fn open_batches(&self) -> usize {
        self.batches.len()
    }

    fn id(&mut self) -> CommandId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn flush_done(&self, region: &str, epoch: Epoch) -> bool {
        match self.flush_epoch {
            Some(e) if e == epoch => {
                matches!(self.flush.get(region), Some(FlushState::Done) | None)
            }
            _ => true,
        }
    }

    /// Picks the next agent of `region` not in `tried`.
    fn pick(&self, region: &str, agents: &Agents, tried: &BTreeSet<String>) -> Option<String> {
        let healthy = agents.get(region)?;
        if let Some(p) = self.preferred.get(region) {
            if healthy.contains(p) && !tried.contains(p) {
                return Some(p.clone());
            }
        }
        healthy.iter().find(|n| !tried.contains(*n)).cloned()
    }

    fn mark_unusable(
        &mut self,
        region: &str,
        reason: String,
        tables: &[String],
        out: &mut Vec<Out>,
    ) {
        match self.health.get_mut(region) {
            Some(RegionHealth::Unusable { missed, .. }) => {
                if let Some(m) = missed {
                    m.extend(tables.iter().cloned());
                }
            }
            _ => {
                self.health.insert(
                    region.to_owned(),
                    RegionHealth::Unusable {
                        recorded: false,
                        missed: Some(tables.iter().cloned().collect()),
                        attempt: None,
                        last_attempt: None,
                    },
                );
                out.push(Out::MarkUnusable {
                    region: region.to_owned(),
                    reason,
                });
            }
        }
    }

    /// The daemon recorded `region` unusable in etcd.
    pub fn unusable_recorded(&mut self, region: &str, now: Instant) -> Vec<Out> {
        if let Some(RegionHealth::Unusable { recorded, .. }) = self.health.get_mut(region) {
            *recorded = true;
        }
        let mut out = Vec::new();
        self.settle(&mut out, now);
        out
    }

    /// Starts `FlushCache { epoch }` to every region (after a new leader epoch).
    pub fn start_flush(&mut self, epoch: Epoch, agents: &Agents, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        if self.flush_epoch.is_some_and(|e| e >= epoch) {
            return out;
        }
        self.flush_epoch = Some(epoch);
        self.last_epoch = self.last_epoch.max(epoch);
        self.flush.clear();
        for region in agents.keys() {
            self.send_flush(region, epoch, agents, BTreeSet::new(), now, &mut out);
        }
        out
    }

    fn send_flush(
        &mut self,
        region: &str,
        epoch: Epoch,
        agents: &Agents,
        mut tried: BTreeSet<String>,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        match self.pick(region, agents, &tried) {
            Some(node) => {
                let id = self.id();
                tried.insert(node.clone());
                out.push(Out::Send {
                    node: node.clone(),
                    msg: CoordMsg::FlushCache { id, epoch },
                });
                self.flush.insert(
                    region.to_owned(),
                    FlushState::Sending {
                        node,
                        id,
                        sent_at: now,
                        tried,
                    },
                );
            }
            None => {
                self.flush.insert(region.to_owned(), FlushState::Done);
                self.mark_unusable(
                    region,
                    format!("no agent of region {region} could flush the cache for epoch {epoch}"),
                    &[],
                    out,
                );
            }
        }
    }

    /// A `Changes` batch from the primary's agent `from`, for the leader epoch `epoch`.
    pub fn on_changes(
        &mut self,
        from: &str,
        batch: ChangesBatch,
        agents: &Agents,
        now: Instant,
    ) -> Vec<Out> {
        let ChangesBatch {
            batch_id,
            tables,
            lsn,
            epoch,
        } = batch;
        let mut out = Vec::new();
        if let Some(b) = self
            .batches
            .iter()
            .find(|b| b.from == from && b.batch_id == batch_id)
        {
            // A re-send of a batch in progress: it is being delivered already.
            let _ = b;
            return out;
        }
        self.last_lsn = self.last_lsn.max(lsn);
        self.last_epoch = self.last_epoch.max(epoch);
        let mut run = BatchRun {
            from: from.to_owned(),
            batch_id,
            tables,
            lsn,
            epoch,
            regions: BTreeMap::new(),
        };
        for region in agents.keys() {
            let d = if self.is_unusable(region) {
                self.mark_unusable(region, String::new(), &run.tables, &mut out);
                Delivery::Unusable
            } else if !self.flush_done(region, epoch) {
                Delivery::Waiting
            } else {
                self.deliver(region, &run, agents, BTreeSet::new(), now, &mut out)
            };
            run.regions.insert(region.clone(), d);
        }
        self.batches.push(run);
        self.settle(&mut out, now);
        out
    }

    fn deliver(
        &mut self,
        region: &str,
        run: &BatchRun,
        agents: &Agents,
        mut tried: BTreeSet<String>,
        now: Instant,
        out: &mut Vec<Out>,
    ) -> Delivery {
        match self.pick(region, agents, &tried) {
            Some(node) => {
                let id = self.id();
                tried.insert(node.clone());
                out.push(Out::Send {
                    node: node.clone(),
                    msg: CoordMsg::Invalidate {
                        id,
                        tables: run.tables.clone(),
                        lsn: run.lsn,
                        epoch: run.epoch,
                    },
                });
                Delivery::Sending {
                    node,
                    id,
                    sent_at: now,
                    tried,
                }
            }
            None => {
                let reason = if tried.is_empty() {
                    format!("region {region} has no healthy agent")
                } else {
                    format!("no agent of region {region} applied the invalidation")
                };
                self.mark_unusable(region, reason, &run.tables, out);
                Delivery::Unusable
            }
        }
    }

    /// An agent's ack of a command id; returns what to do. Ids this module did
    /// not issue are ignored (the caller gives every ack to both books).
    pub fn on_ack(
        &mut self,
        node: &str,
        id: CommandId,
        result: &AckResult,
        agents: &Agents,
        now: Instant,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        let ok = *result == AckResult::Ok;
        // A flush?
        let flush_region = self.flush.iter().find_map(|(r, f)| match f {
            FlushState::Sending { node: n, id: i, .. } if n == node && *i == id => Some(r.clone()),
            _ => None,
        });
        if let Some(region) = flush_region {
            if ok {
                self.flush.insert(region.clone(), FlushState::Done);
                self.preferred.insert(region.clone(), node.to_owned());
                self.release_waiting(&region, agents, now, &mut out);
            } else if let (Some(epoch), Some(FlushState::Sending { tried, .. })) =
                (self.flush_epoch, self.flush.get(&region).cloned())
            {
                self.send_flush(&region, epoch, agents, tried, now, &mut out);
                self.release_waiting(&region, agents, now, &mut out);
            }
            self.settle(&mut out, now);
            return out;
        }
        // A recovery attempt?
        let mut recovered = None;
        for (region, h) in self.health.iter_mut() {
            if let RegionHealth::Unusable { attempt, .. } = h {
                if attempt
                    .as_ref()
                    .is_some_and(|(n, i, _)| n == node && *i == id)
                {
                    *attempt = None;
                    if ok {
                        recovered = Some(region.clone());
                    }
                }
            }
        }
        if let Some(region) = recovered {
            self.health.insert(region.clone(), RegionHealth::Usable);
            self.preferred.insert(region.clone(), node.to_owned());
            out.push(Out::MarkUsable { region });
            return out;
        }
        // A batch delivery?
        let mut found = None;
        for (bi, b) in self.batches.iter().enumerate() {
            for (region, d) in &b.regions {
                if let Delivery::Sending { node: n, id: i, .. } = d {
                    if n == node && *i == id {
                        found = Some((bi, region.clone()));
                    }
                }
            }
        }
        let Some((bi, region)) = found else {
            return out;
        };
        if ok {
            self.preferred.insert(region.clone(), node.to_owned());
            self.batches[bi].regions.insert(region, Delivery::Acked);
        } else {
            self.retry_delivery(bi, &region, agents, now, &mut out);
        }
        self.settle(&mut out, now);
        out
    }

    fn retry_delivery(
        &mut self,
        bi: usize,
        region: &str,
        agents: &Agents,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let tried = match self.batches[bi].regions.get(region) {
            Some(Delivery::Sending { tried, .. }) => tried.clone(),
            _ => return,
        };
        let run = std::mem::replace(
            &mut self.batches[bi],
            BatchRun {
                from: String::new(),
                batch_id: 0,
                tables: Vec::new(),
                lsn: Lsn::ZERO,
                epoch: Epoch::ZERO,
                regions: BTreeMap::new(),
            },
        );
        let d = self.deliver(region, &run, agents, tried, now, out);
        self.batches[bi] = run;
        self.batches[bi].regions.insert(region.to_owned(), d);
    }

    fn release_waiting(&mut self, region: &str, agents: &Agents, now: Instant, out: &mut Vec<Out>) {
        for bi in 0..self.batches.len() {
            let waiting = matches!(
                self.batches[bi].regions.get(region),
                Some(Delivery::Waiting)
            );
            if !waiting || !self.flush_done(region, self.batches[bi].epoch) {
                continue;
            }
            if self.is_unusable(region) {
                let tables = self.batches[bi].tables.clone();
                self.mark_unusable(region, String::new(), &tables, out);
                self.batches[bi]
                    .regions
                    .insert(region.to_owned(), Delivery::Unusable);
                continue;
            }
            let run = std::mem::replace(
                &mut self.batches[bi],
                BatchRun {
                    from: String::new(),
                    batch_id: 0,
                    tables: Vec::new(),
                    lsn: Lsn::ZERO,
                    epoch: Epoch::ZERO,
                    regions: BTreeMap::new(),
                },
            );
            let d = self.deliver(region, &run, agents, BTreeSet::new(), now, out);
            self.batches[bi] = run;
            self.batches[bi].regions.insert(region.to_owned(), d);
        }
    }

    /// Time-driven work: replaces agents that did not ack in time and tries to
    /// recover unusable regions.
    pub fn tick(&mut self, agents: &Agents, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        let timeout = self.cfg.ack_timeout;
        // Flushes that timed out.
        let late_flush: Vec<(String, BTreeSet<String>)> = self
            .flush
            .iter()
            .filter_map(|(r, f)| match f {
                FlushState::Sending { sent_at, tried, .. }
                    if now.saturating_duration_since(*sent_at) >= timeout =>
                {
                    Some((r.clone(), tried.clone()))
                }
                _ => None,
            })
            .collect();
        if let Some(epoch) = self.flush_epoch {
            for (region, tried) in late_flush {
                self.send_flush(&region, epoch, agents, tried, now, &mut out);
                self.release_waiting(&region, agents, now, &mut out);
            }
        }
        // Deliveries that timed out.
        let mut late = Vec::new();
        for (bi, b) in self.batches.iter().enumerate() {
            for (region, d) in &b.regions {
                if let Delivery::Sending { sent_at, .. } = d {
                    if now.saturating_duration_since(*sent_at) >= timeout {
                        late.push((bi, region.clone()));
                    }
                }
            }
        }
        for (bi, region) in late {
            self.retry_delivery(bi, &region, agents, now, &mut out);
        }
        // Recovery of unusable regions.
        let last_lsn = self.last_lsn;
        let every = self.cfg.recovery_every;
        let regions: Vec<String> = self.health.keys().cloned().collect();
        for region in regions {
            let Some(RegionHealth::Unusable {
                recorded: true,
                missed: Some(missed),
                attempt,
                last_attempt,
            }) = self.health.get(&region).cloned()
            else {
                continue;
            };
            let busy =
                attempt.is_some_and(|(_, _, at)| now.saturating_duration_since(at) < timeout);
            let too_soon = last_attempt.is_some_and(|t| now.saturating_duration_since(t) < every);
            if busy || too_soon || last_lsn == Lsn::ZERO {
                continue;
            }
            let Some(node) = self.pick(&region, agents, &BTreeSet::new()) else {
                continue;
            };
            let id = self.id();
            let epoch = self.last_epoch;
            out.push(Out::Send {
                node: node.clone(),
                msg: CoordMsg::Invalidate {
                    id,
                    tables: missed.iter().cloned().collect(),
                    lsn: last_lsn,
                    epoch,
                },
            });
            if let Some(RegionHealth::Unusable {
                attempt,
                last_attempt,
                ..
            }) = self.health.get_mut(&region)
            {
                *attempt = Some((node, id, now));
                *last_attempt = Some(now);
            }
        }
        self.settle(&mut out, now);
        out
    }

    /// Acks, in arrival order, every batch whose regions are all done.
    fn settle(&mut self, out: &mut Vec<Out>, _now: Instant) {
        let health = &self.health;
        let done = |region: &str, d: &Delivery| match d {
            Delivery::Acked => true,
            Delivery::Unusable => matches!(
                health.get(region),
                Some(RegionHealth::Unusable { recorded: true, .. })
            ),
            _ => false,
        };
        let mut keep = Vec::with_capacity(self.batches.len());
        for b in self.batches.drain(..) {
            if b.regions.iter().all(|(r, d)| done(r, d)) {
                out.push(Out::AckPrimary {
                    node: b.from.clone(),
                    batch_id: b.batch_id,
                });
            } else {
                keep.push(b);
            }
        }
        self.batches = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents(spec: &[(&str, &[&str])]) -> Agents {
        spec.iter()
            .map(|(r, ns)| {
                (
                    (*r).to_owned(),
                    ns.iter().map(|n| (*n).to_owned()).collect(),
                )
            })
            .collect()
    }

    fn sends(out: &[Out]) -> Vec<(String, CoordMsg)> {
        out.iter()
            .filter_map(|o| match o {
                Out::Send { node, msg } => Some((node.clone(), msg.clone())),
                _ => None,
            })
            .collect()
    }

    fn id_of(msg: &CoordMsg) -> CommandId {
        match msg {
            CoordMsg::Invalidate { id, .. } | CoordMsg::FlushCache { id, .. } => *id,
            other => panic!("{other:?}"),
        }
    }

    fn acked(out: &[Out]) -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o {
                Out::AckPrimary { batch_id, .. } => Some(*batch_id),
                _ => None,
            })
            .collect()
    }

    fn batch(batch_id: u64, tables: Vec<String>, lsn: Lsn, epoch: Epoch) -> ChangesBatch {
        ChangesBatch {
            batch_id,
            tables,
            lsn,
            epoch,
        }
    }

    fn t(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn one_agent_per_region_and_ack_after_all_regions() {
        let now = Instant::now();
        let a = agents(&[("east", &["e1", "e2"]), ("west", &["w1"])]);
        let mut f = Fanout::new(FanoutConfig::default(), 100);
        let out = f.on_changes("e1", batch(7, t(&["public.t"]), Lsn(50), Epoch(2)), &a, now);
        let s = sends(&out);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, "e1");
        assert_eq!(s[1].0, "w1");
        assert_eq!(
            s[0].1,
            CoordMsg::Invalidate {
                id: id_of(&s[0].1),
                tables: t(&["public.t"]),
                lsn: Lsn(50),
                epoch: Epoch(2)
            }
        );
        assert!(acked(&out).is_empty());
        let out = f.on_ack("e1", id_of(&s[0].1), &AckResult::Ok, &a, now);
        assert!(acked(&out).is_empty(), "west has not acked");
        let out = f.on_ack("w1", id_of(&s[1].1), &AckResult::Ok, &a, now);
        assert_eq!(
            out,
            vec![Out::AckPrimary {
                node: "e1".into(),
                batch_id: 7
            }]
        );
        assert_eq!(f.open_batches(), 0);
        // A duplicate ack changes nothing.
        assert!(f
            .on_ack("w1", id_of(&s[1].1), &AckResult::Ok, &a, now)
            .is_empty());
    }

    #[test]
    fn the_agent_that_acked_is_preferred() {
        let now = Instant::now();
        let a = agents(&[("east", &["e1", "e2"])]);
        let mut f = Fanout::new(FanoutConfig::default(), 1);
        let s = sends(&f.on_changes("p", batch(1, t(&["s.a"]), Lsn(1), Epoch(1)), &a, now));
        // e1 fails; e2 takes over and then stays preferred.
        let s2 = sends(&f.on_ack(
            "e1",
            id_of(&s[0].1),
            &AckResult::Failed {
                message: "no redis".into(),
            },
            &a,
            now,
        ));
        assert_eq!(s2[0].0, "e2");
        f.on_ack("e2", id_of(&s2[0].1), &AckResult::Ok, &a, now);
        let s3 = sends(&f.on_changes("p", batch(2, t(&["s.a"]), Lsn(2), Epoch(1)), &a, now));
        assert_eq!(s3[0].0, "e2");
    }

    #[test]
    fn a_silent_agent_is_replaced_after_the_timeout_then_the_region_is_unusable() {
        let now = Instant::now();
        let a = agents(&[("east", &["e1", "e2"])]);
        let mut f = Fanout::new(FanoutConfig::default(), 1);
        let s = sends(&f.on_changes("p", batch(1, t(&["s.a"]), Lsn(9), Epoch(1)), &a, now));
        assert_eq!(s[0].0, "e1");
        assert!(f.tick(&a, now + Duration::from_millis(999)).is_empty());
        let out = f.tick(&a, now + Duration::from_secs(1));
        let s2 = sends(&out);
        assert_eq!(s2.len(), 1);
        assert_eq!(s2[0].0, "e2");
        assert_ne!(id_of(&s2[0].1), id_of(&s[0].1));
        // e2 silent too: no agent left, the region is marked unusable.
        let out = f.tick(&a, now + Duration::from_secs(2));
        assert!(
            matches!(&out[..], [Out::MarkUnusable { region, .. }] if region == "east"),
            "{out:?}"
        );
        assert!(f.is_unusable("east"));
        // The primary's ack waits until etcd recorded it.
        let out = f.unusable_recorded("east", now + Duration::from_secs(2));
        assert_eq!(acked(&out), vec![1]);
        // A late ack of the first agent is ignored.
        assert!(f
            .on_ack("e1", id_of(&s[0].1), &AckResult::Ok, &a, now)
            .is_empty());
    }

    #[test]
    fn a_region_without_agents_is_unusable_and_does_not_block_the_primary() {
        let now = Instant::now();
        let a = agents(&[("east", &["e1"]), ("west", &[])]);
        let mut f = Fanout::new(FanoutConfig::default(), 1);
        let out = f.on_changes("e1", batch(1, t(&["s.a"]), Lsn(10), Epoch(1)), &a, now);
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::MarkUnusable { region, .. } if region == "west")));
        let e = sends(&out);
        assert_eq!(e.len(), 1);
        f.on_ack("e1", id_of(&e[0].1), &AckResult::Ok, &a, now);
        let out = f.unusable_recorded("west", now);
        assert_eq!(acked(&out), vec![1]);
        // Later batches do not wait for west at all.
        let out = f.on_changes("e1", batch(2, t(&["s.b"]), Lsn(20), Epoch(1)), &a, now);
        let e = sends(&out);
        assert_eq!(e.len(), 1);
        let out = f.on_ack("e1", id_of(&e[0].1), &AckResult::Ok, &a, now);
        assert_eq!(acked(&out), vec![2]);

        // West gets an agent: a catch-up of everything it missed, then usable.
        let a2 = agents(&[("east", &["e1"]), ("west", &["w1"])]);
        let out = f.tick(&a2, now + Duration::from_secs(2));
        let s = sends(&out);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, "w1");
        match &s[0].1 {
            CoordMsg::Invalidate { tables, lsn, .. } => {
                assert_eq!(tables, &t(&["s.a", "s.b"]));
                assert_eq!(*lsn, Lsn(20));
            }
            other => panic!("{other:?}"),
        }
        let out = f.on_ack(
            "w1",
            id_of(&s[0].1),
            &AckResult::Ok,
            &a2,
            now + Duration::from_secs(2),
        );
        assert_eq!(
            out,
            vec![Out::MarkUsable {
                region: "west".into()
            }]
        );
        assert!(!f.is_unusable("west"));
    }

    #[test]
    fn flush_goes_first_after_a_new_epoch() {
        let now = Instant::now();
        let a = agents(&[("east", &["e1"]), ("west", &["w1"])]);
        let mut f = Fanout::new(FanoutConfig::default(), 1);
        let out = f.start_flush(Epoch(3), &a, now);
        let flushes = sends(&out);
        assert_eq!(flushes.len(), 2);
        assert!(flushes.iter().all(|(_, m)| matches!(
            m,
            CoordMsg::FlushCache {
                epoch: Epoch(3),
                ..
            }
        )));
        assert!(
            f.start_flush(Epoch(3), &a, now).is_empty(),
            "once per epoch"
        );
        // A batch of epoch 3 waits for each region's flush.
        let out = f.on_changes("e1", batch(1, t(&["s.a"]), Lsn(5), Epoch(3)), &a, now);
        assert!(sends(&out).is_empty());
        let out = f.on_ack("e1", id_of(&flushes[0].1), &AckResult::Ok, &a, now);
        let s = sends(&out);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, "e1");
        assert!(matches!(s[0].1, CoordMsg::Invalidate { .. }));
        f.on_ack("e1", id_of(&s[0].1), &AckResult::Ok, &a, now);
        let out = f.on_ack("w1", id_of(&flushes[1].1), &AckResult::Ok, &a, now);
        let s = sends(&out);
        assert_eq!(s[0].0, "w1");
        let out = f.on_ack("w1", id_of(&s[0].1), &AckResult::Ok, &a, now);
        assert_eq!(acked(&out), vec![1]);
    }

    #[test]
    fn batches_are_acked_as_they_complete_and_resends_are_not_duplicated() {
        let now = Instant::now();
        let a = agents(&[("east", &["e1"])]);
        let mut f = Fanout::new(FanoutConfig::default(), 1);
        let s1 = sends(&f.on_changes("p", batch(1, t(&["s.a"]), Lsn(1), Epoch(1)), &a, now));
        assert!(f
            .on_changes("p", batch(1, t(&["s.a"]), Lsn(1), Epoch(1)), &a, now)
            .is_empty());
        let s2 = sends(&f.on_changes("p", batch(2, t(&["s.b"]), Lsn(2), Epoch(1)), &a, now));
        let out = f.on_ack("e1", id_of(&s2[0].1), &AckResult::Ok, &a, now);
        assert_eq!(acked(&out), vec![2]);
        let out = f.on_ack("e1", id_of(&s1[0].1), &AckResult::Ok, &a, now);
        assert_eq!(acked(&out), vec![1]);
    }

    #[test]
    fn view_lists_fresh_connected_agents_per_region() {
        let now = Instant::now();
        let old = now - Duration::from_secs(2);
        let view = agents_view(
            [("a", "east"), ("b", "east"), ("c", "west"), ("d", "south")],
            [
                ("b", "east", now),
                ("a", "east", now),
                ("c", "west", old),
                ("x", "north", now),
            ],
            |n| n != "x",
            now,
            Duration::from_millis(500),
        );
        assert_eq!(view["east"], t(&["a", "b"]));
        assert!(view["west"].is_empty(), "stale heartbeat");
        assert!(view["south"].is_empty(), "never heard of");
        assert!(view["north"].is_empty(), "not connected");
    }

    #[test]
    fn a_region_marked_by_an_earlier_coordinator_stays_unusable() {
        let now = Instant::now();
        let a = agents(&[("east", &["e1"])]);
        let mut f = Fanout::new(FanoutConfig::default(), 1);
        f.seed_unusable("east");
        let out = f.on_changes("p", batch(1, t(&["s.a"]), Lsn(1), Epoch(1)), &a, now);
        assert!(sends(&out).is_empty());
        assert_eq!(acked(&out), vec![1]);
        assert!(sends(&f.tick(&a, now + Duration::from_secs(5))).is_empty());
    }
}
