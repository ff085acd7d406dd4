//! The regional result cache (opt-in, `[cache]`): results of eligible reads kept in the
//! region's Redis and served without touching a database.
//!
//! A session asks [`RegionCache::plan`] whether a read is cacheable (rules, eligibility, the
//! region's cache usable, the relation catalog of its database loaded); a planned read is looked
//! up ([`store::CacheStore::lookup`]) and served when [`rules::may_serve`] allows it. On a miss
//! the read runs on a replica between two `pg_last_wal_replay_lsn()` queries pipelined on the
//! same connection (no added round trip), its result messages are captured as they are
//! forwarded, and the entry is stored in the background. Keys carry the cluster epoch, so a
//! failover starts from an empty cache; the agents raise per-table watermarks on every change
//! (see `docs/control-path.md`, invalidation fan-out), which makes older entries unservable.

pub mod entry;
pub mod fill;
pub mod relations;
pub mod rules;
pub mod store;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use meridian_shared::config::ProxyConfig;
use meridian_sqlroute::Analysis;

use crate::topology::LeaderView;
use crate::Shared;
use relations::RelationCatalogs;
use rules::CacheRules;
use store::CacheStore;

/// The query the proxy pipelines around a cache fill, on the replica running it.
pub const REPLAY_LSN_QUERY: &str = "SELECT pg_catalog.pg_last_wal_replay_lsn()";

/// A read the cache may answer or fill.
#[derive(Debug, Clone)]
pub struct Plan {
    pub hash: String,
    pub tables: Vec<String>,
    pub ttl: Duration,
    pub epoch: meridian_shared::epoch::Epoch,
}

/// A read as the cache sees it.
pub struct Request<'a> {
    pub analysis: &'a Analysis,
    /// The statement's text (what `pattern` rules match).
    pub sql: &'a str,
    /// What the client asked for exactly: [`entry::simple_identity`] or
    /// [`entry::extended_identity`].
    pub identity: &'a [u8],
    pub database: &'a str,
    pub user: &'a str,
    /// The session's parameters as replayed on backends.
    pub params: &'a [(String, String)],
}

/// The proxy's handle on its region's cache.
pub struct RegionCache {
    pub store: Arc<CacheStore>,
    pub relations: RelationCatalogs,
    rules: RwLock<(Arc<ProxyConfig>, Arc<CacheRules>)>,
}

impl RegionCache {
    /// The cache configured by `cfg`, if enabled.
    pub fn from_config(cfg: &Arc<ProxyConfig>) -> Result<Option<RegionCache>, redis::RedisError> {
        if !cfg.cache.enabled {
            return Ok(None);
        }
        let store = CacheStore::new(&cfg.cache.redis, &cfg.etcd.cluster, cfg.cache.timeout)?;
        Ok(Some(RegionCache {
            store,
            relations: RelationCatalogs::default(),
            rules: RwLock::new((cfg.clone(), Arc::new(CacheRules::from_config(&cfg.cache)))),
        }))
    }

    fn rules(&self, cfg: &Arc<ProxyConfig>) -> Arc<CacheRules> {
        {
            let r = self.rules.read().unwrap_or_else(|e| e.into_inner());
            if Arc::ptr_eq(&r.0, cfg) {
                return r.1.clone();
            }
        }
        let rules = Arc::new(CacheRules::from_config(&cfg.cache));
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = (cfg.clone(), rules.clone());
        rules
    }

    /// Whether (and how) `request` goes through the cache. `None`: run it as usual.
    pub fn plan(&self, shared: &Arc<Shared>, request: &Request<'_>) -> Option<Plan> {
        let cfg = shared.config();
        if !cfg.cache.enabled || request.database != cfg.cache.database {
            return None;
        }
        let rules = self.rules(&cfg);
        let Request {
            analysis,
            sql,
            identity,
            database,
            user,
            params,
        } = request;
        let hint = analysis.hint.cache_ttl;
        if hint.is_none() && rules.is_empty() {
            return None;
        }
        let (epoch, usable) = {
            let t = shared.topology().borrow();
            // Only under a serving leader (or a static topology): during a failover, replicas
            // may still show commits the new primary will not have.
            let settled = matches!(t.state, LeaderView::Serving | LeaderView::Static);
            (t.epoch, settled && t.cache_usable)
        };
        if !usable {
            shared.metrics().cache_lookup("unusable");
            return None;
        }
        let relations = self.relations.get(shared, database)?;
        let tables = match rules::eligible(analysis, &shared.catalog(), &relations) {
            Ok(tables) => tables,
            Err(rules::Skip::UnknownRelation) => {
                self.relations.refresh_soon(database);
                return None;
            }
            Err(_) => return None,
        };
        let ttl = rules.ttl(sql, hint, &tables)?;
        Some(Plan {
            hash: entry::entry_hash(database, user, params, identity),
            tables,
            ttl,
            epoch: meridian_shared::epoch::Epoch(epoch),
        })
    }
}
