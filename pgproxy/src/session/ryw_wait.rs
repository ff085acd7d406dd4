//! Read-your-writes for a read about to go to a replica: the thin async wrapper around
//! the pure decision [`ryw::ryw_target`]. It keeps a held local replica that has replayed
//! what the read needs, else picks one that has, waiting up to `routing.ryw_wait` (with
//! the replica pollers hurried) when a local one may still catch up, else sends the read
//! to the primary. A read the client pipelined behind unanswered work cannot wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::metrics::OutcomeLabel;
use crate::route::Which;
use crate::ryw::{self, Need, RywStep};
use crate::shared::Shared;

/// Where the read goes: the primary, or a replica (`Some(addr)`: this one, which the
/// session must hold — a held other replica is replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RywChoice {
    Primary,
    Replica(Option<Arc<str>>),
}

/// Chooses the backend of a read that needs `need`. `held`: the replica the session
/// holds (if any) and whether the topology still backs it; `can_wait`: nothing of the
/// session is in flight; `salt` spreads sessions over equally good replicas.
pub async fn choose(
    shared: &Shared,
    need: &Need,
    held: Option<(&Arc<str>, bool)>,
    can_wait: bool,
    salt: u64,
) -> RywChoice {
    if need.is_empty() {
        return RywChoice::Replica(None);
    }
    let table = shared.replicas().clone();
    let cfg = shared.config();
    let metrics = shared.metrics().clone();
    let count = |outcome: &'static str, waited: Duration| {
        metrics
            .ryw_reads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        metrics.ryw_wait_seconds.observe(waited.as_secs_f64());
    };
    // A held local replica that fits is kept (a held remote one is not: the local
    // replica is preferred again as soon as it catches up).
    if let Some((addr, held_fresh)) = held {
        let local = shared
            .topology()
            .borrow()
            .replicas
            .iter()
            .any(|b| b.addr == *addr && b.region == cfg.region);
        if local && held_fresh && ryw::fits(need, table.observed(addr).as_ref()) == ryw::Fit::Yes {
            count("replica_immediate", Duration::ZERO);
            return RywChoice::Replica(None);
        }
    }
    let started = Instant::now();
    let mut guard = None;
    loop {
        let candidates = shared.topology().borrow().ryw_candidates(&cfg.region);
        let obs = |v: &[Arc<str>]| -> Vec<Option<ryw::Observed>> {
            v.iter().map(|a| table.observed(a)).collect()
        };
        let waited = if can_wait {
            started.elapsed()
        } else {
            cfg.routing.ryw_wait
        };
        let (local_obs, beside_obs) = (obs(&candidates.local), obs(&candidates.beside_primary));
        let step = ryw::ryw_target(
            need,
            &ryw::Candidates {
                local: &local_obs,
                beside_primary: &beside_obs,
                primary_local: candidates.primary_local,
            },
            salt,
            waited,
            cfg.routing.ryw_wait,
        );
        let addr = match step {
            RywStep::Local(i) => candidates.local.get(i).cloned(),
            RywStep::BesidePrimary(i) => candidates.beside_primary.get(i).cloned(),
            RywStep::Wait(remaining) => {
                guard.get_or_insert_with(|| table.wait_guard());
                tokio::select! {
                    _ = table.updated() => {}
                    _ = tokio::time::sleep(remaining.min(ryw::FAST_POLL)) => {}
                }
                continue;
            }
            RywStep::Primary => None,
        };
        let waited = started.elapsed();
        let Some(addr) = addr else {
            count("primary_fallback", waited);
            debug!(?need, ?waited, "read-your-writes: read runs on the primary");
            return RywChoice::Primary;
        };
        if held.is_some_and(|(h, _)| *h != addr) && !can_wait {
            // The held replica is behind and cannot be swapped with work in flight.
            count("primary_fallback", waited);
            return RywChoice::Primary;
        }
        count(
            if guard.is_some() {
                "replica_after_wait"
            } else {
                "replica_immediate"
            },
            waited,
        );
        return RywChoice::Replica(Some(addr));
    }
}

/// The read needs the primary anyway when the choice says so.
pub fn target(choice: &RywChoice) -> Which {
    match choice {
        RywChoice::Primary => Which::Primary,
        RywChoice::Replica(_) => Which::Replica,
    }
}
