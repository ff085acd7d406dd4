//! The start of a client connection, as phases in order:
//!
//! 1. **negotiation** ([`negotiate`]): SSLRequest (TLS), GSSENCRequest, CancelRequest;
//! 2. **startup checks** ([`startup`], pure): protocol version, `_pq_.` options, TLS
//!    required, replication refused, user name, session parameters;
//! 3. **admission**: `max_clients` counts a connection from its accept (as PostgreSQL
//!    counts a backend from its fork), so connections still logging in hold a slot; one
//!    over the limit is told 53300 once its startup packet is read;
//! 4. **authentication** ([`crate::auth`]), then the user's database allowance and the
//!    session parameters' errors, which PostgreSQL reports after authentication too;
//! 5. **hand-over** ([`enter_session`]): the session takes the connection.
//!
//! Phases 1–4 are bounded by `client_login_timeout` from accept: a client that sends
//! nothing, dribbles its startup packet, or stops halfway through authentication is
//! disconnected — silently before its startup packet is complete (as PostgreSQL does),
//! with FATAL 57014 "canceling authentication due to timeout" after it. Every error
//! raised here is a [`ProxyError`]; a FATAL to a client that does not read gets at
//! most [`FAREWELL`] before the connection is closed.
//!
//! Generic over the client's stream, so every phase can be driven over
//! `tokio::io::duplex` in tests.

pub mod negotiate;
pub mod startup;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meridian_shared::config::{PoolMode, ProxyConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, Instrument};

pub use negotiate::{ClientStream, Negotiated};

use crate::auth::{self, AuthError, AuthSettings, ScramKeys};
use crate::client::ClientConn;
use crate::error::ProxyError;
use crate::session::backends::PoolConnector;
use crate::session::Login;
use crate::wire;
use crate::Shared;

/// How long a refused client has to take its FATAL message before the close.
pub const FAREWELL: Duration = Duration::from_secs(1);

/// How the login phases ended without a session.
#[derive(Debug)]
pub enum Ended {
    /// The client is refused with this FATAL error.
    Refused(ProxyError),
    /// The connection closes without a word.
    Quiet(Quiet),
}

/// Why a connection closed without a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiet {
    /// The client left (or its connection broke).
    Left,
    /// `client_login_timeout` ran out before the startup packet was complete.
    TimedOut,
    /// The TLS handshake failed.
    TlsFailed,
    /// A CancelRequest was served (PostgreSQL answers none).
    Cancel,
}

/// An authenticated client: what the session needs, the input of [`enter_session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub user: String,
    pub database: String,
    pub backend_user: String,
    pub backend_password: Option<String>,
    pub mode: PoolMode,
    /// Every setting the client asked for, in the order they apply (see [`startup`]).
    pub startup_params: Vec<(String, String)>,
}

/// Serves one accepted TCP connection to the end.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let id = shared.next_session_id();
    let span =
        tracing::info_span!("conn", session = id, client = %peer, region = %shared.config().region);
    async move {
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
        serve_stream(tcp, shared).await;
    }
    .instrument(span)
    .await
}

/// Serves one client connection over any stream, from its first byte to the end.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(stream: S, shared: Arc<Shared>) {
    let cfg = shared.config();
    let admitted = shared.admit_client(cfg.max_clients);
    let mut client = ClientConn::new(ClientStream::Plain(stream), cfg.max_message_size);
    client.set_deadline(Some(Instant::now() + cfg.client_login_timeout));
    match login(&mut client, &shared, &cfg, admitted.is_some()).await {
        Ok(who) => {
            client.set_deadline(None);
            enter_session(client, shared, who).await;
            drop(admitted);
        }
        Err(ended) => {
            // The slot is free before the client can read why it was refused.
            drop(admitted);
            end(client, &shared, ended).await;
        }
    }
}

/// Phases 1–4: negotiation, startup checks, admission, authentication.
async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<ClientStream<S>>,
    shared: &Shared,
    cfg: &ProxyConfig,
    admitted: bool,
) -> Result<Authenticated, Ended> {
    let (version, params) =
        match negotiate::negotiate(client, shared.tls_acceptor(), cfg.max_startup_packet).await? {
            Negotiated::Startup { version, params } => (version, params),
            Negotiated::Cancel { pid, secret } => {
                forward_cancel(shared, (pid, secret), client.deadline()).await;
                return Err(Ended::Quiet(Quiet::Cancel));
            }
        };
    let request =
        startup::check_startup(version, &params, client.stream.is_tls(), cfg.tls.required)
            .map_err(Ended::Refused)?;
    if let Some(unsupported) = &request.negotiate {
        let names: Vec<&str> = unsupported.iter().map(String::as_str).collect();
        client.send(&wire::negotiate_protocol_version(&names));
    }
    if !admitted {
        return Err(Ended::Refused(ProxyError::TooManyClients));
    }

    let user_cfg = cfg.user(&request.user);
    let settings = AuthSettings {
        default_method: cfg.auth,
        max_message: cfg.max_auth_message,
        keys: ScramKeys::global(),
    };
    auth::authenticate(client, &request.user, user_cfg, &settings)
        .await
        .map_err(|e| match e {
            AuthError::Refused(e) => {
                info!(user = %request.user, error = %e, "authentication failed");
                Ended::Refused(e)
            }
            AuthError::Gone(e) => {
                debug!(error = %e, "client left during authentication");
                Ended::Quiet(Quiet::Left)
            }
        })?;
    if let Some(u) = user_cfg {
        if !u.databases.is_empty() && !u.databases.contains(&request.database) {
            return Err(Ended::Refused(ProxyError::NotAuthorized {
                reason: format!(
                    "user \"{}\" may not connect to database \"{}\"",
                    request.user, request.database
                ),
            }));
        }
    }
    auth::accept(client).map_err(|e| match e {
        AuthError::Refused(e) => Ended::Refused(e),
        AuthError::Gone(_) => Ended::Quiet(Quiet::Left),
    })?;
    let startup_params = request.session_params.map_err(Ended::Refused)?;
    Ok(Authenticated {
        backend_user: user_cfg
            .and_then(|u| u.backend_user.clone())
            .unwrap_or_else(|| request.user.clone()),
        backend_password: user_cfg
            .and_then(|u| u.backend_password.clone().or_else(|| u.password.clone())),
        mode: user_cfg.and_then(|u| u.pool_mode).unwrap_or(cfg.pool.mode),
        user: request.user,
        database: request.database,
        startup_params,
    })
}

/// Forwards a CancelRequest carrying one of the proxy's keys to the backend that runs
/// that client's query, if any; never longer than `deadline`.
async fn forward_cancel(shared: &Shared, key: (i32, i32), deadline: Option<Instant>) {
    let Some(b) = shared.cancel().lookup(key) else {
        return;
    };
    debug!(backend = %b.addr, "forwarding cancel request");
    let send = crate::backend::send_cancel(&b.addr, b.pid, b.secret);
    let sent = match deadline {
        Some(d) => tokio::time::timeout_at(d, send)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
        None => send.await,
    };
    if let Err(e) = sent {
        debug!(error = %e, "cancel forwarding failed");
    }
}

/// Ends a connection that did not log in: the FATAL, the metrics, the log.
async fn end<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: ClientConn<ClientStream<S>>,
    shared: &Shared,
    ended: Ended,
) {
    match ended {
        Ended::Refused(e) => {
            if e == ProxyError::LoginTimeout {
                shared.metrics().login_timeouts.inc();
            }
            shared.metrics().proxy_error(&e);
            debug!(reason = e.label(), sqlstate = %e.sqlstate(), "client refused");
            client.refuse(&e, FAREWELL).await;
        }
        Ended::Quiet(Quiet::TimedOut) => {
            shared.metrics().login_timeouts.inc();
            debug!("client_login_timeout before the startup packet: closed");
        }
        Ended::Quiet(why) => debug!(?why, "connection closed before login"),
    }
}

/// Phase 5: the session takes the connection — its login on a backend (the startup
/// parameters applied there, the server's answer as the startup reply), then the relay.
pub async fn enter_session<S: AsyncRead + AsyncWrite + Unpin>(
    client: ClientConn<S>,
    shared: Arc<Shared>,
    who: Authenticated,
) {
    let connector = PoolConnector::new(
        shared.clone(),
        who.backend_user.clone(),
        who.database.clone(),
        who.backend_password.clone(),
        rand::random(),
    );
    let login = Login {
        user: who.user,
        database: who.database,
        backend_user: who.backend_user,
        backend_password: who.backend_password,
        mode: who.mode,
        startup_params: who.startup_params,
    };
    if let Err(e) = crate::session::login::serve(shared, client, login, connector).await {
        debug!(error = %e, "session ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SqlState;
    use crate::shared::SharedParts;
    use bytes::{BufMut, BytesMut};
    use meridian_shared::config::{AuthMethod, UserConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::watch;

    /// A proxy's shared state with no reachable backend, and its config sender.
    fn shared(cfg: ProxyConfig) -> (Arc<Shared>, watch::Sender<Arc<ProxyConfig>>) {
        let topology = Arc::new(crate::topology::Topology::from_config(&cfg));
        let (cfg_tx, cfg_rx) = watch::channel(Arc::new(cfg));
        let (_topo_tx, topo_rx) = watch::channel(topology);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(SharedParts {
            config: cfg_rx,
            pools: Arc::default(),
            topology: topo_rx,
            replicas: crate::health::ReplicaTable::default(),
            classifier: meridian_sqlroute::Classifier::new(16),
            catalog: meridian_sqlroute::FunctionCatalog::with_builtin_defaults(),
            metrics: Arc::default(),
            backend_tls: crate::tls::BackendTls::disabled(),
            tls_acceptor: None,
            shutdown: stop_rx,
            cache: None,
        }));
        (shared, cfg_tx)
    }

    fn config() -> ProxyConfig {
        let mut cfg = ProxyConfig {
            client_login_timeout: Duration::from_millis(200),
            max_clients: 1,
            ..Default::default()
        };
        cfg.backends.primary = Some("127.0.0.1:1".into());
        cfg.users = vec![UserConfig {
            name: "app".into(),
            password: Some("pw".into()),
            scram_verifier: None,
            auth: None,
            backend_user: None,
            backend_password: None,
            pool_mode: None,
            databases: vec![],
        }];
        cfg
    }

    fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_i32(wire::PROTOCOL_3_0);
        for (k, v) in params {
            body.put_slice(format!("{k}\0{v}\0").as_bytes());
        }
        body.put_u8(0);
        let mut b = BytesMut::new();
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(&body);
        b.to_vec()
    }

    /// (tag, auth code or SQLSTATE) of every message until the proxy closes.
    async fn answers(mut peer: DuplexStream) -> Vec<(u8, String)> {
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut raw))
            .await
            .expect("the proxy did not close the connection")
            .unwrap();
        let mut out = Vec::new();
        let mut buf = &raw[..];
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            let f = wire::Frame::new(buf[0], &buf[5..1 + len]);
            let what = match f.tag {
                b'R' => i32::from_be_bytes(f.body()[..4].try_into().unwrap()).to_string(),
                b'E' => wire::error_fields(&f).1,
                _ => String::new(),
            };
            out.push((f.tag, what));
            buf = &buf[1 + len..];
        }
        out
    }

    #[tokio::test]
    async fn a_login_stalled_in_scram_holds_its_slot_until_the_timeout_then_gets_57014() {
        let (shared, _cfg) = shared(config());
        let (a, mut stalled) = tokio::io::duplex(4096);
        let first = tokio::spawn(serve_stream(a, shared.clone()));
        stalled
            .write_all(&startup_packet(&[("user", "app")]))
            .await
            .unwrap();
        let mut head = [0u8; 5];
        stalled.read_exact(&mut head).await.unwrap();
        let mut body = vec![0u8; i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize - 4];
        stalled.read_exact(&mut body).await.unwrap();
        assert_eq!((head[0], &body[..4]), (b'R', &10i32.to_be_bytes()[..]));

        // The one slot is taken: the next client is told so after its startup packet.
        let (b, mut second) = tokio::io::duplex(4096);
        let refused = tokio::spawn(serve_stream(b, shared.clone()));
        second
            .write_all(&startup_packet(&[("user", "app")]))
            .await
            .unwrap();
        assert_eq!(
            answers(second).await,
            vec![(b'E', SqlState::TooManyConnections.as_str().to_owned())]
        );
        refused.await.unwrap();

        // The stalled one ends at the deadline with FATAL 57014.
        assert_eq!(
            answers(stalled).await,
            vec![(b'E', SqlState::QueryCanceled.as_str().to_owned())]
        );
        first.await.unwrap();
        assert_eq!(shared.metrics().login_timeouts.get(), 1);
    }

    #[tokio::test]
    async fn bad_options_are_refused_after_authentication_like_postgresql() {
        let mut cfg = config();
        cfg.auth = AuthMethod::Trust;
        cfg.users.clear();
        let (shared, _cfg) = shared(cfg);
        let (a, mut peer) = tokio::io::duplex(4096);
        let task = tokio::spawn(serve_stream(a, shared.clone()));
        peer.write_all(&startup_packet(&[("user", "u"), ("options", "-c foo")]))
            .await
            .unwrap();
        assert_eq!(
            answers(peer).await,
            vec![
                (b'R', "0".to_owned()),
                (b'E', SqlState::SyntaxError.as_str().to_owned())
            ]
        );
        task.await.unwrap();
        // Counted by class and by reason.
        let body = shared.metrics().render(shared.pools());
        assert!(body.contains("errors_total{class=\"42\"} 1"), "{body}");
        assert!(
            body.contains("proxy_errors_total{reason=\"invalid_options\"} 1"),
            "{body}"
        );
    }
}
