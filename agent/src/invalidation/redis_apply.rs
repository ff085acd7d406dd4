//! Applies invalidation commands to the region's Redis (DESIGN.md §5
//! "Regional cache", §6), using the key layout of
//! [`meridian_shared::cache_keys`].
//!
//! `Invalidate { tables, lsn, epoch }` runs one Lua script, so it is atomic:
//! each table's watermark is raised to `lsn` (never lowered; compared as
//! decimal strings, exact for any `u64`), the entry keys listed in each table's
//! tag set of `epoch` are unlinked with the tag sets, and the JSON
//! [`InvalidationEvent`] is published on `meridian:invalidate`. Applying the
//! same command twice is harmless. `FlushCache { epoch }` scans the cluster's
//! entry, tag and freshness keys (`SCAN MATCH`) and unlinks those of older epochs;
//! watermarks stay. The connection is a [`ConnectionManager`] created on first
//! use (so an agent whose Redis is down starts anyway) with short timeouts;
//! errors are returned for the caller to ack `Failed`. Limits: a single Redis
//! (not Redis Cluster: the script touches keys of many slots).

use std::time::Duration;

use meridian_shared::cache_keys::{self, InvalidationEvent, INVALIDATE_CHANNEL};
use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use super::freshness::Lease;

/// KEYS = n watermark keys, then n tag keys; ARGV = lsn (decimal), channel, event.
const INVALIDATE_LUA: &str = r#"
local n = #KEYS / 2
local lsn = ARGV[1]
local raised = 0
for i = 1, n do
  local cur = redis.call('GET', KEYS[i])
  local greater = (not cur) or (#lsn > #cur) or (#lsn == #cur and lsn > cur)
  if greater then
    redis.call('SET', KEYS[i], lsn)
    raised = raised + 1
  end
end
local deleted = 0
for i = n + 1, #KEYS do
  local members = redis.call('SMEMBERS', KEYS[i])
  for j = 1, #members, 500 do
    local last = math.min(j + 499, #members)
    deleted = deleted + redis.call('UNLINK', unpack(members, j, last))
  end
  redis.call('UNLINK', KEYS[i])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {raised, deleted}
"#;

/// Timeouts of the Redis connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisApplyConfig {
    /// Connecting (default 500 ms).
    pub connect_timeout: Duration,
    /// One command or script (default 500 ms).
    pub response_timeout: Duration,
}

impl Default for RedisApplyConfig {
    fn default() -> Self {
        RedisApplyConfig {
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_millis(500),
        }
    }
}

/// Why applying to Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("--redis URL {url:?} is invalid: {source}")]
    Url {
        url: String,
        source: redis::RedisError,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What one `Invalidate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidateOutcome {
    /// Watermarks raised (the others were already at or above the LSN).
    pub raised: u64,
    /// Cache entries unlinked.
    pub deleted: u64,
}

/// The region's Redis, as the agent writes it.
pub struct RedisApplier {
    client: redis::Client,
    cluster: String,
    cfg: RedisApplyConfig,
    conn: Mutex<Option<ConnectionManager>>,
}

impl RedisApplier {
    /// An applier for `url` (e.g. `redis://127.0.0.1:6379`); connects on first use.
    pub fn new(url: &str, cluster: &str, cfg: RedisApplyConfig) -> Result<Self, ApplyError> {
        let client = redis::Client::open(url).map_err(|source| ApplyError::Url {
            url: url.to_owned(),
            source,
        })?;
        Ok(RedisApplier {
            client,
            cluster: cluster.to_owned(),
            cfg,
            conn: Mutex::new(None),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, ApplyError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.cfg.connect_timeout))
            .set_response_timeout(Some(self.cfg.response_timeout))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            self.cfg.connect_timeout * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting to redis timed out",
            ))
        })??;
        *guard = Some(manager.clone());
        Ok(manager)
    }

    /// Raises the watermarks of `tables` to `lsn`, drops their cached entries
    /// of `epoch` and publishes the event.
    pub async fn invalidate(
        &self,
        tables: &[String],
        lsn: Lsn,
        epoch: Epoch,
    ) -> Result<InvalidateOutcome, ApplyError> {
        let tables: Vec<String> = tables
            .iter()
            .map(|t| cache_keys::normalize_table(t))
            .collect();
        let event = InvalidationEvent {
            tables: tables.clone(),
            lsn,
            epoch,
        };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(INVALIDATE_LUA).arg(tables.len() * 2);
        for t in &tables {
            cmd.arg(cache_keys::watermark_key(&self.cluster, t));
        }
        for t in &tables {
            cmd.arg(cache_keys::tag_key(&self.cluster, epoch, t));
        }
        cmd.arg(cache_keys::watermark_value(lsn))
            .arg(INVALIDATE_CHANNEL)
            .arg(event.to_json());
        let mut conn = self.connection().await?;
        let (raised, deleted): (u64, u64) = cmd.query_async(&mut conn).await?;
        Ok(InvalidateOutcome { raised, deleted })
    }

    /// Writes the region's freshness lease (`cache_keys::fresh_key`): it
    /// expires after `lease.ttl` unless renewed.
    pub async fn renew_fresh(&self, lease: &Lease) -> Result<(), ApplyError> {
        let ms = u64::try_from(lease.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut conn = self.connection().await?;
        redis::cmd("SET")
            .arg(cache_keys::fresh_key(&self.cluster, lease.epoch))
            .arg(cache_keys::watermark_value(lease.horizon))
            .arg("PX")
            .arg(ms)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Unlinks every entry and tag key of an epoch older than `epoch`; returns
    /// how many keys were unlinked.
    pub async fn flush_older_epochs(&self, epoch: Epoch) -> Result<u64, ApplyError> {
        let mut conn = self.connection().await?;
        let pattern = cache_keys::all_epochs_pattern(&self.cluster);
        let mut cursor: u64 = 0;
        let mut unlinked = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            let old: Vec<&String> = keys
                .iter()
                .filter(|k| cache_keys::is_older_epoch_key(&self.cluster, k, epoch))
                .collect();
            if !old.is_empty() {
                let n: u64 = redis::cmd("UNLINK").arg(old).query_async(&mut conn).await?;
                unlinked += n;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(unlinked)
    }
}
