//! Keeps the function catalog fresh: which functions are immutable, stable or
//! volatile, read from the primary's `pg_proc` every `routing.catalog_refresh`.
//! Until the first refresh succeeds, the classifier's built-in defaults apply.

use std::sync::Arc;
use std::time::Duration;

use meridian_sqlroute::FunctionCatalog;
use tracing::{debug, warn};

use crate::backend::{BackendConn, ConnectParams};
use crate::Shared;

const QUERY: &str =
    "SELECT proname, max(provolatile::text) FROM pg_catalog.pg_proc GROUP BY proname";

/// Loads the catalog once from `addr`.
pub async fn load(
    shared: &Shared,
    addr: Arc<str>,
) -> Result<FunctionCatalog, crate::backend::BackendError> {
    let cfg = shared.config();
    let params = ConnectParams {
        addr,
        user: cfg.routing.catalog_user.clone(),
        database: cfg.routing.catalog_database.clone(),
        password: cfg.routing.catalog_password.clone(),
        tls: shared.backend_tls().clone(),
        connect_timeout: cfg.pool.connect_timeout,
        max_message: cfg.max_message_size,
    };
    let mut conn = BackendConn::connect(&params).await?;
    let rows = conn.simple_query(QUERY).await?;
    conn.terminate().await;
    let mut catalog = FunctionCatalog::from_rows(rows.into_iter().filter_map(|r| {
        let mut it = r.into_iter();
        let name = it.next()??;
        let vol = it.next()??.chars().next()?;
        Some((name, vol))
    }));
    catalog.add_read_safe(cfg.routing.read_safe_functions.iter().cloned());
    Ok(catalog)
}

/// Refreshes the catalog forever (retrying quickly until the first success).
pub async fn refresh_loop(shared: Arc<Shared>) {
    let mut loaded = false;
    loop {
        let primary = shared.topology().borrow().primary.clone();
        if let Some(addr) = primary {
            match load(&shared, addr).await {
                Ok(c) => {
                    debug!("function catalog refreshed");
                    shared.set_catalog(c);
                    loaded = true;
                }
                Err(e) => warn!(error = %e, "cannot refresh the function catalog"),
            }
        }
        let wait = if loaded {
            shared.config().routing.catalog_refresh
        } else {
            Duration::from_secs(1)
        };
        tokio::time::sleep(wait).await;
    }
}
