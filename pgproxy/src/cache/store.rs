//! The region's Redis as the proxy uses it: one lookup round trip (the region's freshness
//! lease, the entry and its tables' watermarks in one pipeline) and a fire-and-forget store.
//!
//! Every call is bounded by `cache.timeout` (default 20 ms): a slow or dead Redis makes reads
//! uncached, never failed. After a few consecutive failures the store is bypassed for a second
//! so that reads stop paying the timeout; the connection is (re)made in the background by
//! redis' `ConnectionManager`. Keys follow `meridian_shared::cache_keys`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_shared::cache_keys::{self, parse_watermark};
use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tracing::{debug, warn};

/// Consecutive failures after which the store is bypassed for [`BYPASS_FOR`].
const FAILURES_BEFORE_BYPASS: u32 = 3;
const BYPASS_FOR: Duration = Duration::from_secs(1);

/// What a lookup found.
#[derive(Debug)]
pub enum Found {
    /// The stored entry (undecoded) and each guarding table's watermark.
    Entry(Bytes, Vec<(String, Option<Lsn>)>),
    Miss,
    /// The region's freshness lease is missing: the invalidation stream is not known to
    /// reach this Redis in time, so nothing may be served (the read runs on a replica).
    Lagging,
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis is being bypassed after repeated failures")]
    Bypassed,
    #[error("no redis connection yet")]
    NotConnected,
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

impl StoreError {
    /// Metric label of the outcome.
    pub fn outcome(&self) -> &'static str {
        match self {
            StoreError::Bypassed => "bypass",
            StoreError::NotConnected | StoreError::Redis(_) => "error",
            StoreError::Timeout(_) => "timeout",
        }
    }
}

/// A region's Redis, shared by every session of the proxy.
pub struct CacheStore {
    client: redis::Client,
    cluster: String,
    timeout: Duration,
    conn: Mutex<Option<ConnectionManager>>,
    connecting: Mutex<bool>,
    failures: AtomicU32,
    bypass_until: Mutex<Option<Instant>>,
}

impl CacheStore {
    /// A store for `url`; connects in the background on first use.
    pub fn new(
        url: &str,
        cluster: &str,
        timeout: Duration,
    ) -> Result<Arc<Self>, redis::RedisError> {
        Ok(Arc::new(CacheStore {
            client: redis::Client::open(url)?,
            cluster: cluster.to_owned(),
            timeout,
            conn: Mutex::new(None),
            connecting: Mutex::new(false),
            failures: AtomicU32::new(0),
            bypass_until: Mutex::new(None),
        }))
    }

    fn connection(self: &Arc<Self>) -> Result<ConnectionManager, StoreError> {
        if let Some(c) = lock(&self.conn).as_ref() {
            return Ok(c.clone());
        }
        let mut connecting = lock(&self.connecting);
        if !*connecting {
            *connecting = true;
            tokio::spawn(self.clone().connect_loop());
        }
        Err(StoreError::NotConnected)
    }

    async fn connect_loop(self: Arc<Self>) {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                self.client
                    .get_connection_manager_with_config(config.clone()),
            )
            .await;
            match attempt {
                Ok(Ok(manager)) => {
                    debug!("connected to the cache's redis");
                    *lock(&self.conn) = Some(manager);
                    *lock(&self.connecting) = false;
                    return;
                }
                Ok(Err(e)) => debug!(error = %e, "cannot connect to the cache's redis"),
                Err(_) => debug!("connecting to the cache's redis timed out"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn check_bypass(&self) -> Result<(), StoreError> {
        let mut until = lock(&self.bypass_until);
        match *until {
            Some(t) if Instant::now() < t => Err(StoreError::Bypassed),
            Some(_) => {
                *until = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn record<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => self.failures.store(0, Ordering::Relaxed),
            Err(StoreError::Bypassed | StoreError::NotConnected) => {}
            Err(e) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= FAILURES_BEFORE_BYPASS {
                    self.failures.store(0, Ordering::Relaxed);
                    *lock(&self.bypass_until) = Some(Instant::now() + BYPASS_FOR);
                    warn!(error = %e, "the cache's redis keeps failing; reads run uncached for {BYPASS_FOR:?}");
                }
            }
        }
        r
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// The entry `hash` of `epoch` and the watermarks of `tables`, in one round trip, unless
    /// the region's freshness lease of `epoch` is missing.
    pub async fn lookup(
        self: &Arc<Self>,
        epoch: Epoch,
        hash: &str,
        tables: &[String],
    ) -> Result<Found, StoreError> {
        self.check_bypass()?;
        let mut conn = self.connection()?;
        let mut pipe = redis::pipe();
        pipe.get(cache_keys::fresh_key(&self.cluster, epoch));
        pipe.get(cache_keys::entry_key(&self.cluster, epoch, hash));
        for t in tables {
            pipe.get(cache_keys::watermark_key(&self.cluster, t));
        }
        let r = self
            .bounded(pipe.query_async::<Vec<Option<Vec<u8>>>>(&mut conn))
            .await;
        let mut values = self.record(r)?.into_iter();
        if values.next().flatten().is_none() {
            return Ok(Found::Lagging);
        }
        let Some(Some(entry)) = values.next() else {
            return Ok(Found::Miss);
        };
        let watermarks = tables
            .iter()
            .zip(values)
            .map(|(t, v)| {
                let wm = v.and_then(|b| std::str::from_utf8(&b).ok().and_then(parse_watermark));
                (t.clone(), wm)
            })
            .collect();
        Ok(Found::Entry(Bytes::from(entry), watermarks))
    }

    /// Stores `value` as entry `hash` of `epoch` for `ttl` and tags it with `tables`.
    pub async fn store(
        self: &Arc<Self>,
        epoch: Epoch,
        hash: &str,
        tables: &[String],
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.check_bypass()?;
        let mut conn = self.connection()?;
        let key = cache_keys::entry_key(&self.cluster, epoch, hash);
        let ttl_ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        // Tag sets outlive their entries a little; deleting a tag set never hurts correctness.
        let tag_ms = ttl_ms.saturating_add(60_000);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("SET")
            .arg(&key)
            .arg(value.as_ref())
            .arg("PX")
            .arg(ttl_ms)
            .ignore();
        for t in tables {
            let tag = cache_keys::tag_key(&self.cluster, epoch, t);
            pipe.cmd("SADD").arg(&tag).arg(&key).ignore();
            pipe.cmd("PEXPIRE").arg(&tag).arg(tag_ms).arg("NX").ignore();
            pipe.cmd("PEXPIRE").arg(&tag).arg(tag_ms).arg("GT").ignore();
        }
        let r = self.bounded(pipe.query_async::<()>(&mut conn)).await;
        self.record(r)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
