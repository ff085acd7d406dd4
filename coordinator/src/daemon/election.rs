//! The election: terms of a lease kept alive in etcd, a campaign in the
//! `coordinator/` election, the standby wait (publishing an inactive status,
//! dropping agents' messages) and the hand-over to the active [`Active`] term.
//!
//! A term ends when the lease's local deadline passes (step down at once and
//! campaign again with a new lease) or at shutdown (resign, then revoke the lease
//! so that a standby takes over without waiting for the TTL). No command goes out
//! after the lease's local deadline: the send time of the last acknowledged
//! keep-alive plus the TTL, which never falls after etcd's own expiry.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use etcd_client::{CampaignResponse, Client, LeaderKey, ResignOptions};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use super::{stopped, Active, DaemonError, Shell};
use crate::store::{self, StoreError};

/// etcd is re-read this often while standby (for the status).
const REFRESH_STANDBY: Duration = Duration::from_millis(500);
/// Pause after a term that failed before its campaign was decided.
const RETRY_TERM: Duration = Duration::from_millis(500);

/// Local deadline of the election lease: the send time of the last acknowledged
/// keep-alive plus the TTL (conservative: etcd's own clock started later).
pub(super) type LeaseDeadline = watch::Receiver<Instant>;

/// How a term ended (an error ends it too).
pub(super) enum TermEnd {
    Shutdown,
    LeaseLost,
}

/// How the standby wait ended.
enum Standby {
    Elected(LeaderKey),
    Shutdown,
    LeaseLost,
    Failed(etcd_client::Error),
}

impl Shell {
    /// Runs terms until shutdown.
    pub(super) async fn terms(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), DaemonError> {
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            match self.term(shutdown).await {
                Ok(TermEnd::Shutdown) => return Ok(()),
                Ok(TermEnd::LeaseLost) => {
                    warn!("election lease lost; stepping down and campaigning again");
                }
                Err(e) => {
                    error!(error = %e, "election term failed; retrying");
                    tokio::select! {
                        () = stopped(shutdown) => return Ok(()),
                        () = tokio::time::sleep(RETRY_TERM) => {}
                    }
                }
            }
            let _ = self.active_tx.send(false);
        }
    }

    /// One lease: campaign, wait as a standby, act while elected.
    async fn term(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<TermEnd, DaemonError> {
        let ttl_secs = i64::try_from(self.settings.election_ttl.as_secs().max(1)).unwrap_or(2);
        let granted =
            tokio::time::timeout(store::ETCD_TIMEOUT, self.etcd.lease_grant(ttl_secs, None))
                .await
                .map_err(|_| StoreError::Timeout(store::ETCD_TIMEOUT))??;
        let lease = granted.id();
        let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(2));
        let (deadline_tx, deadline_rx) = watch::channel(Instant::now() + ttl);
        let keeper = tokio::spawn(keep_alive(self.etcd.clone(), lease, ttl, deadline_tx));

        let value = serde_json::to_vec(&self.settings.record)?;
        let mut election = self.etcd.election_client();
        let name = self.keys.coordinator_election();
        let (elected_tx, mut elected_rx) = oneshot::channel();
        let campaign = tokio::spawn(async move {
            // One campaign per term. Campaigning again with the same lease after the
            // client's request timeout looked cheaper but is unsafe: etcd resigns (deletes
            // the key of) a campaign whose request was cancelled, which can delete the key
            // the new campaign reused, so that campaign returned "elected" with no key in
            // etcd (agents then read "election: no leader"; seen in the test command).
            let result = election.campaign(name, value, lease).await;
            let _ = elected_tx.send(result);
        });

        let end = self
            .standby_until_elected(shutdown, &mut elected_rx, &deadline_rx)
            .await;
        let end = match end {
            Standby::Elected(key) => {
                info!(coordinator = %self.settings.name, "elected active coordinator");
                let _ = self.active_tx.send(true);
                let end = Active::new(self, &deadline_rx)
                    .run(self, shutdown, &deadline_rx)
                    .await;
                let _ = self.active_tx.send(false);
                if matches!(end, TermEnd::Shutdown) {
                    let mut election = self.etcd.election_client();
                    let _ = tokio::time::timeout(
                        store::ETCD_TIMEOUT,
                        election.resign(Some(ResignOptions::new().with_leader(key))),
                    )
                    .await;
                }
                end
            }
            Standby::Shutdown => TermEnd::Shutdown,
            Standby::LeaseLost => TermEnd::LeaseLost,
            Standby::Failed(e) => {
                campaign.abort();
                keeper.abort();
                return Err(e.into());
            }
        };
        campaign.abort();
        keeper.abort();
        // Revoking deletes the election key at once, so a standby takes over without
        // waiting for the TTL (on lease loss it is gone already).
        let _ = tokio::time::timeout(store::ETCD_TIMEOUT, self.etcd.lease_revoke(lease)).await;
        Ok(end)
    }

    async fn standby_until_elected(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        elected: &mut oneshot::Receiver<Result<CampaignResponse, etcd_client::Error>>,
        deadline: &LeaseDeadline,
    ) -> Standby {
        let mut tick = tokio::time::interval(REFRESH_STANDBY);
        loop {
            tokio::select! {
                () = stopped(shutdown) => return Standby::Shutdown,
                result = &mut *elected => {
                    return match result {
                        Ok(Ok(mut resp)) => match resp.take_leader() {
                            Some(key) => Standby::Elected(key),
                            None => Standby::LeaseLost,
                        },
                        Ok(Err(e)) => Standby::Failed(e),
                        Err(_) => Standby::LeaseLost,
                    };
                }
                Some(msg) = self.inbound.recv() => {
                    // Connections are refused while standby; a late message is dropped.
                    debug!(?msg, "message while standby dropped");
                }
                _ = tick.tick() => {
                    if Instant::now() >= *deadline.borrow() {
                        return Standby::LeaseLost;
                    }
                    self.publish_standby_status().await;
                }
            }
        }
    }

    /// The status a standby shows: etcd's records, no agent reports.
    async fn publish_standby_status(&mut self) {
        let Ok(snap) = store::read_snapshot(&mut self.etcd, &self.keys).await else {
            return;
        };
        let status = self.status(&snap, false, &BTreeMap::new(), &BTreeSet::new());
        self.control.status.send_replace(status);
    }
}

/// Keeps `lease` alive, publishing its local deadline; stops when the lease is gone.
async fn keep_alive(client: Client, lease: i64, ttl: Duration, deadline: watch::Sender<Instant>) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut client = client;
    let mut keeper = None;
    loop {
        if keeper.is_none() {
            match tokio::time::timeout(period, client.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => keeper = Some(pair),
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some((k, stream)) = keeper.as_mut() else {
            continue;
        };
        let sent = Instant::now();
        let ok = async {
            k.keep_alive().await.ok()?;
            stream.message().await.ok()?
        };
        match tokio::time::timeout(period, ok).await {
            Ok(Some(resp)) if resp.ttl() > 0 => {
                let _ = deadline
                    .send(sent + Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0)));
            }
            Ok(Some(_)) => {
                // TTL 0: the lease has expired; the term is over.
                let _ = deadline.send(sent);
                return;
            }
            _ => keeper = None,
        }
        tokio::time::sleep(period.saturating_sub(sent.elapsed())).await;
    }
}
