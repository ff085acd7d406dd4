//! The recent cluster events an admin surface keeps: a bounded log fed from the
//! decision loop's broadcast, with counters for the metrics and a re-broadcast
//! that subscribers join atomically with a snapshot (no event is missed or seen
//! twice between "recent" and "live").
//!
//! The log only knows what happened since it started: after a coordinator
//! restart, or on a standby, it starts empty.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::control::ClusterEvent;

/// Kind of the note recorded when the log itself fell behind the loop's broadcast.
pub const LAGGED_KIND: &str = "lagged";

/// How many events a log keeps by default (the status page shows 50).
pub const DEFAULT_CAPACITY: usize = 200;

/// Counters derived from the events seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// `failover_started` events.
    pub failovers: u64,
    /// `switchover_started` events.
    pub switchovers: u64,
    /// Events this log missed because it fell behind.
    pub skipped: u64,
}

struct Inner {
    recent: VecDeque<ClusterEvent>,
    counts: EventCounts,
}

/// A bounded log of recent events with a live feed.
pub struct EventLog {
    capacity: usize,
    inner: Mutex<Inner>,
    live: broadcast::Sender<ClusterEvent>,
}

impl EventLog {
    /// An empty log keeping at most `capacity` events.
    pub fn new(capacity: usize) -> Arc<EventLog> {
        let (live, _) = broadcast::channel(1024);
        Arc::new(EventLog {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                recent: VecDeque::new(),
                counts: EventCounts::default(),
            }),
            live,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the data inconsistent
        // (each update is a single push/pop), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds an event (dropping the oldest beyond capacity) and forwards it live.
    pub fn record(&self, event: ClusterEvent) {
        let mut inner = self.lock();
        match event.kind.as_str() {
            "failover_started" => inner.counts.failovers += 1,
            "switchover_started" => inner.counts.switchovers += 1,
            _ => {}
        }
        inner.recent.push_back(event.clone());
        while inner.recent.len() > self.capacity {
            inner.recent.pop_front();
        }
        // No live subscriber is fine.
        let _ = self.live.send(event);
    }

    /// Records that `n` events were missed, as a note event.
    pub fn record_lagged(&self, n: u64, at_ms: u64) {
        self.lock().counts.skipped += n;
        self.record(lagged_note(n, at_ms));
    }

    /// The last `n` events, oldest first.
    pub fn recent(&self, n: usize) -> Vec<ClusterEvent> {
        let inner = self.lock();
        let skip = inner.recent.len().saturating_sub(n);
        inner.recent.iter().skip(skip).cloned().collect()
    }

    /// The last `n` events and a receiver of every later one, taken atomically.
    pub fn subscribe(&self, n: usize) -> (Vec<ClusterEvent>, broadcast::Receiver<ClusterEvent>) {
        let inner = self.lock();
        let rx = self.live.subscribe();
        let skip = inner.recent.len().saturating_sub(n);
        (inner.recent.iter().skip(skip).cloned().collect(), rx)
    }

    pub fn counts(&self) -> EventCounts {
        self.lock().counts
    }
}

/// The note sent in place of `n` events a receiver missed.
pub fn lagged_note(n: u64, at_ms: u64) -> ClusterEvent {
    ClusterEvent {
        at_ms,
        kind: LAGGED_KIND.to_string(),
        node: None,
        epoch: 0,
        message: format!("{n} events skipped: this receiver fell behind"),
    }
}

/// Unix milliseconds now (for notes only; decisions never read the clock here).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Feeds `log` from the loop's broadcast until `shutdown` resolves.
pub fn spawn_collector(
    events: &broadcast::Sender<ClusterEvent>,
    log: Arc<EventLog>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let mut rx = events.subscribe();
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                received = rx.recv() => match received {
                    Ok(event) => log.record(event),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "event log fell behind the decision loop");
                        log.record_lagged(n, now_ms());
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, at_ms: u64) -> ClusterEvent {
        ClusterEvent {
            at_ms,
            kind: kind.into(),
            node: Some("n1".into()),
            epoch: 1,
            message: String::new(),
        }
    }

    #[test]
    fn keeps_the_last_events_and_counts_failovers() {
        let log = EventLog::new(3);
        for (i, kind) in [
            "elected",
            "failover_started",
            "promoted",
            "switchover_started",
        ]
        .iter()
        .enumerate()
        {
            log.record(ev(kind, i as u64));
        }
        let recent = log.recent(10);
        assert_eq!(
            recent.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(log.recent(1)[0].kind, "switchover_started");
        let counts = log.counts();
        assert_eq!((counts.failovers, counts.switchovers), (1, 1));
        log.record_lagged(7, 9);
        assert_eq!(log.counts().skipped, 7);
        assert_eq!(log.recent(1)[0].kind, LAGGED_KIND);
    }

    #[test]
    fn subscription_continues_where_the_snapshot_ends() {
        let log = EventLog::new(10);
        log.record(ev("a", 1));
        let (snapshot, mut rx) = log.subscribe(5);
        log.record(ev("b", 2));
        assert_eq!(snapshot.len(), 1);
        assert_eq!(snapshot[0].kind, "a");
        assert_eq!(rx.try_recv().map(|e| e.kind).ok().as_deref(), Some("b"));
        assert!(rx.try_recv().is_err());
    }
}
