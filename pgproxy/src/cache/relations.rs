//! Which relation names the cache may guard with watermarks, per database.
//!
//! Invalidations arrive per table, as logical decoding names them: `schema.table` of the
//! ordinary table that changed. A cached read is only safe when every relation it reads is such
//! a table: not a view (its base tables change, not the view), not a partitioned or inheritance
//! parent (changes are reported under the child's name), not a materialized view (a refresh is
//! not decoded). An unqualified name is guarded by every schema's table of that name, so the
//! entry is invalidated whatever the session's `search_path` resolved it to.
//!
//! [`RelationCatalog`] is the pure lookup; [`RelationCatalogs`] loads one per database from the
//! primary's `pg_class` on first use and refreshes it every `routing.catalog_refresh`, or sooner
//! (at most once per [`MIN_REFRESH_GAP`]) when a read that could be cached names a relation the
//! catalog does not know: a table created since the last load becomes cacheable within about a
//! second, not a whole refresh period. Until the first load of a database, nothing in it is
//! cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::backend::{BackendConn, ConnectParams};
use crate::Shared;

/// Relations outside the system schemas, with what the cache needs to know about them.
const QUERY: &str =
    "SELECT n.nspname, c.relname, c.relkind::text, c.relhassubclass, c.relispartition \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r','p','v','m','f') \
     AND n.nspname NOT IN ('pg_catalog','information_schema') \
     AND n.nspname !~ '^pg_(toast|temp_)'";

/// The shortest time between two loads of a database's catalog: unknown relations ask for an
/// early refresh, and a stream of them must not turn into a stream of catalog queries.
pub const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// How a relation name in a query resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Ordinary tables (`schema.table`) whose watermarks guard an entry reading the name.
    Tables(Vec<String>),
    /// A relation whose changes are not reported under its own name.
    NotCacheable,
    /// No relation of that name (in that schema) was there at the last load.
    Unknown,
}

/// Relation names of one database: `relname` → `(schema, cacheable)` for each schema holding it.
#[derive(Debug, Default, Clone)]
pub struct RelationCatalog {
    by_name: HashMap<String, Vec<(String, bool)>>,
}

impl RelationCatalog {
    /// Builds the catalog from `(schema, relname, relkind, relhassubclass, relispartition)` rows.
    pub fn from_rows<S: Into<String>>(
        rows: impl IntoIterator<Item = (S, S, char, bool, bool)>,
    ) -> Self {
        let mut by_name: HashMap<String, Vec<(String, bool)>> = HashMap::new();
        for (schema, name, kind, has_children, is_partition) in rows {
            let cacheable = kind == 'r' && !has_children && !is_partition;
            by_name
                .entry(name.into())
                .or_default()
                .push((schema.into(), cacheable));
        }
        RelationCatalog { by_name }
    }

    /// Resolves a relation as a query names it (`t` or `schema.t`, identifiers folded).
    pub fn resolve(&self, written: &str) -> Resolved {
        let (schema, name) = match written.rsplit_once('.') {
            Some((s, n)) => (Some(s.rsplit('.').next().unwrap_or(s)), n),
            None => (None, written),
        };
        let Some(candidates) = self.by_name.get(name) else {
            // The system catalogs are never loaded, and never cacheable.
            let system = match schema {
                Some(s) => s == "pg_catalog" || s == "information_schema",
                None => name.starts_with("pg_"),
            };
            return if system {
                Resolved::NotCacheable
            } else {
                Resolved::Unknown
            };
        };
        let chosen: Vec<&(String, bool)> = match schema {
            Some(s) => candidates.iter().filter(|(cs, _)| cs == s).collect(),
            None => candidates.iter().collect(),
        };
        if chosen.is_empty() {
            return Resolved::Unknown;
        }
        if chosen.iter().any(|(_, ok)| !ok) {
            return Resolved::NotCacheable;
        }
        Resolved::Tables(chosen.iter().map(|(s, _)| format!("{s}.{name}")).collect())
    }
}

/// One [`RelationCatalog`] per database, loaded on demand and kept fresh in the background.
#[derive(Default)]
pub struct RelationCatalogs {
    loaded: Mutex<HashMap<String, Arc<RelationCatalog>>>,
    /// Databases with a refresh loop, and how to wake it early.
    watched: Mutex<HashMap<String, Arc<Notify>>>,
}

impl RelationCatalogs {
    /// The catalog of `database`, or `None` before its first load (which this call starts).
    pub fn get(&self, shared: &Arc<Shared>, database: &str) -> Option<Arc<RelationCatalog>> {
        if let Some(c) = lock(&self.loaded).get(database) {
            return Some(c.clone());
        }
        let mut watched = lock(&self.watched);
        if !watched.contains_key(database) {
            let wake = Arc::new(Notify::new());
            watched.insert(database.to_owned(), wake.clone());
            tokio::spawn(refresh_loop(shared.clone(), database.to_owned(), wake));
        }
        None
    }

    /// A read named a relation `database`'s catalog does not know: reload it soon (no
    /// sooner than [`MIN_REFRESH_GAP`] after the last load).
    pub fn refresh_soon(&self, database: &str) {
        if let Some(wake) = lock(&self.watched).get(database) {
            wake.notify_one();
        }
    }

    fn set(&self, database: &str, catalog: RelationCatalog) {
        lock(&self.loaded).insert(database.to_owned(), Arc::new(catalog));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn load(shared: &Shared, addr: Arc<str>, database: &str) -> anyhow::Result<RelationCatalog> {
    let cfg = shared.config();
    let params = ConnectParams {
        addr,
        user: cfg.routing.catalog_user.clone(),
        database: database.to_owned(),
        password: cfg.routing.catalog_password.clone(),
        tls: shared.backend_tls().clone(),
        connect_timeout: cfg.pool.connect_timeout,
        max_message: cfg.max_message_size,
    };
    let mut conn = BackendConn::connect(&params).await?;
    let rows = conn.simple_query(QUERY).await?;
    conn.terminate().await;
    Ok(RelationCatalog::from_rows(rows.into_iter().filter_map(
        |r| {
            let mut it = r.into_iter();
            let schema = it.next()??;
            let name = it.next()??;
            let kind = it.next()??.chars().next()?;
            let children = it.next()?? == "t";
            let partition = it.next()?? == "t";
            Some((schema, name, kind, children, partition))
        },
    )))
}

async fn refresh_loop(shared: Arc<Shared>, database: String, wake: Arc<Notify>) {
    let mut loaded = false;
    loop {
        let started = tokio::time::Instant::now();
        if *shared.shutdown().borrow() {
            return;
        }
        let primary = shared.topology().borrow().primary.clone();
        if let Some(addr) = primary {
            match load(&shared, addr, &database).await {
                Ok(c) => {
                    debug!(%database, "relation catalog refreshed");
                    if let Some(cache) = &shared.cache() {
                        cache.relations.set(&database, c);
                    }
                    loaded = true;
                }
                Err(e) => warn!(%database, error = %e, "cannot load the relation catalog"),
            }
        }
        let wait = if loaded {
            shared.config().routing.catalog_refresh
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {
                tokio::time::sleep_until(started + MIN_REFRESH_GAP).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_rules() {
        let c = RelationCatalog::from_rows([
            ("public", "t", 'r', false, false),
            ("app", "t", 'r', false, false),
            ("public", "v", 'v', false, false),
            ("app", "mixed", 'r', false, false),
            ("public", "mixed", 'v', false, false),
            ("public", "parent", 'r', true, false),
        ]);
        let tables = |v: &[&str]| Resolved::Tables(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(c.resolve("t"), tables(&["public.t", "app.t"]));
        assert_eq!(c.resolve("app.t"), tables(&["app.t"]));
        assert_eq!(c.resolve("db.app.t"), tables(&["app.t"]));
        assert_eq!(
            c.resolve("other.t"),
            Resolved::Unknown,
            "created since the load?"
        );
        assert_eq!(c.resolve("v"), Resolved::NotCacheable);
        assert_eq!(c.resolve("app.mixed"), tables(&["app.mixed"]));
        assert_eq!(c.resolve("mixed"), Resolved::NotCacheable);
        assert_eq!(c.resolve("parent"), Resolved::NotCacheable);
        assert_eq!(c.resolve("nope"), Resolved::Unknown);
        assert_eq!(c.resolve("pg_class"), Resolved::NotCacheable);
        assert_eq!(
            c.resolve("information_schema.tables"),
            Resolved::NotCacheable
        );
        assert_eq!(c.resolve("nowhere.t"), Resolved::Unknown);
    }
}
