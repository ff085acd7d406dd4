//! The session's first phase, after authentication: which kind of session this is, the
//! backend the login runs on, the client's cancel key, and the startup reply.
//!
//! A session is **bound** when it pools by session, no replica can serve its reads and
//! the topology is static (a proxy following a leader promises sessions that survive a
//! failover, which one backend for life cannot keep): it keeps one primary connection
//! for life — its own, outside the pools, closed when the client leaves, so that a new
//! client connection is a new server process as directly — and is given that backend's
//! real process id, so `pg_backend_pid()`, `pg_terminate_backend()` and notification pids agree with
//! what the client knows (its cancel key still goes through the proxy's registry). Any
//! other session is **virtual** and gets a process id of the proxy's own.
//!
//! The startup parameters (the client's, and those of its `options`) are applied on the
//! login backend with SET; what the server reports back (canonical names such as
//! `UTF8`, its `ParameterStatus` values) is what the client sees, and a parameter the
//! server refuses ends the login with the server's error, as a direct login would.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::backends::{Backends, Connector};
use super::{CancelKey, Login, Session, SessionError};
use crate::client::ClientConn;
use crate::engine::{Engine, EngineConfig, Refusal};
use crate::error::Severity;
use crate::protocol::backend as be_msg;
use crate::route::Which;
use crate::shared::Shared;
use crate::wire;

/// Logs the session in on a backend and runs it to its end.
pub async fn serve<S, C>(
    shared: Arc<Shared>,
    mut client: ClientConn<S>,
    login: Login,
    connector: C,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: Connector,
{
    let cfg = shared.config();
    let replica = connector.replica_available();
    let bound = login.mode == meridian_shared::config::PoolMode::Session
        && !replica
        && !connector.follows_leader();
    let mut conns = Backends::new(connector);
    let first = if replica {
        Which::Replica
    } else {
        Which::Primary
    };
    let w = if bound {
        // One server process for the client's connection, opened and closed with it.
        match conns.hold_dedicated().await {
            Ok(()) => Which::Primary,
            Err(e) => return refuse(&shared, &mut client, e).await,
        }
    } else {
        match conns.ensure(first, None, false).await {
            Ok(_) => first,
            Err(e) if first == Which::Replica => {
                debug!(error = ?e, "replica unavailable at login, using the primary");
                match conns.ensure(Which::Primary, None, false).await {
                    Ok(_) => Which::Primary,
                    Err(e) => return refuse(&shared, &mut client, e).await,
                }
            }
            Err(e) => return refuse(&shared, &mut client, e).await,
        }
    };
    let Some(conn) = conns.get(w) else {
        return Ok(());
    };
    let (key, slot) = if bound {
        shared.cancel().register_with_pid(conn.state.pid)
    } else {
        shared.cancel().register()
    };
    let cancel = CancelKey {
        shared: shared.clone(),
        key,
        slot,
    };
    let mut engine = Engine::new(EngineConfig {
        mode: login.mode,
        bound,
        client_key: key,
        learns_commits: cfg.routing.read_your_writes,
        cache_max_entry: cfg.cache.max_entry_bytes,
    });
    engine.start_login(w, &mut conn.state, &login.startup_params);
    let inputs = super::Inputs::new(&shared, replica);
    let mut session = Session {
        inputs,
        queries: shared.metrics().query_counters(),
        shared,
        client,
        conns,
        engine,
        login,
        cancel,
        cancel_target: None,
        cache: Default::default(),
        stalled: None,
        backlog: Default::default(),
        fill_next: None,
        salt: rand::random(),
        started: None,
        closing: false,
    };
    loop {
        session.after_engine().await?;
        session.write_out().await?;
        if session.closing || !session.engine.logging_in() {
            break;
        }
        let Some(conn) = session.conns.get(w) else {
            break;
        };
        let r = conn.read_frame().await;
        session.on_backend(w, r).await;
    }
    if session.closing {
        session.finish().await;
        return Ok(());
    }
    debug!(bound, "session started");
    session.run().await
}

/// Ends a login no backend could be had for, with the server's error (a missing
/// database, a refused login) or the proxy's, as FATAL.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    client: &mut ClientConn<S>,
    refusal: Refusal,
) -> Result<(), SessionError> {
    let frame = match refusal {
        Refusal::Server(f) => {
            let info = be_msg::error_info(&f);
            shared.metrics().error(&info.code);
            wire::error_response("FATAL", &info.code, &info.message)
        }
        Refusal::Proxy(e) => {
            shared.metrics().error(e.sqlstate().as_str());
            e.to_frame(Severity::Fatal)
        }
    };
    client.send(&frame);
    let _ = client.flush().await;
    Ok(())
}
