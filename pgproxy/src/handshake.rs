//! The start of a client connection: SSLRequest / GSSENCRequest negotiation,
//! CancelRequest forwarding, the startup packet's checks (protocol version,
//! replication mode, user, client limit), authentication, and the startup
//! reply (ParameterStatus, BackendKeyData, ReadyForQuery). Hands a ready
//! [`Session`] to the relay.

use std::net::SocketAddr;
use std::sync::Arc;

use meridian_shared::config::AuthMethod;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, Instrument};

use crate::auth;
use crate::client::ClientConn;
use crate::session::backends::PoolConnector;
use crate::session::Login;
use crate::stream::MaybeTls;
use crate::wire::{self, StartupPacket, PROTOCOL_3_0};
use crate::Shared;

/// Startup parameters replayed on backends as session settings.
const REPLAYED_PARAMS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "search_path",
    "extra_float_digits",
    "default_transaction_read_only",
    "statement_timeout",
    "lock_timeout",
];

/// Serves one accepted TCP connection to the end.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let id = shared.next_session_id();
    let span =
        tracing::info_span!("conn", session = id, client = %peer, region = %shared.config().region);
    async move {
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
        let cfg = shared.config();
        let mut client = ClientConn::new(MaybeTls::Plain(tcp), cfg.max_message_size);
        let mut tls_done = false;
        let packet = loop {
            let p = match client.read_startup(cfg.max_startup_packet).await {
                Ok(p) => p,
                Err(e) => {
                    debug!(error = %e, "bad startup packet");
                    client.fatal("08P01", &format!("invalid startup packet: {e}")).await;
                    return;
                }
            };
            match p {
                StartupPacket::SslRequest if !tls_done => {
                    let acceptor = shared.tls_acceptor().cloned();
                    let (stream, rest) = client.into_parts();
                    let MaybeTls::Plain(mut tcp) = stream else { return };
                    if !rest.is_empty() {
                        // Bytes after SSLRequest before the handshake: possible injection.
                        return;
                    }
                    match acceptor {
                        Some(acceptor) => {
                            if tcp.write_all(b"S").await.is_err() {
                                return;
                            }
                            match acceptor.accept(tcp).await {
                                Ok(tls) => {
                                    client = ClientConn::new(MaybeTls::Server(Box::new(tls)), cfg.max_message_size);
                                    tls_done = true;
                                }
                                Err(e) => {
                                    debug!(error = %e, "TLS handshake failed");
                                    return;
                                }
                            }
                        }
                        None => {
                            if tcp.write_all(b"N").await.is_err() {
                                return;
                            }
                            client = ClientConn::new(MaybeTls::Plain(tcp), cfg.max_message_size);
                        }
                    }
                }
                StartupPacket::GssEncRequest => {
                    client.send_raw(b"N");
                    if client.flush().await.is_err() {
                        return;
                    }
                }
                StartupPacket::Cancel { pid, secret } => {
                    if let Some(b) = shared.cancel().lookup((pid, secret)) {
                        debug!(backend = %b.addr, "forwarding cancel request");
                        if let Err(e) = crate::backend::send_cancel(&b.addr, b.pid, b.secret).await {
                            debug!(error = %e, "cancel forwarding failed");
                        }
                    }
                    return;
                }
                other => break other,
            }
        };
        let StartupPacket::Startup { version, params } = packet else {
            client.fatal("08P01", "unexpected startup packet").await;
            return;
        };
        if version >> 16 != 3 {
            client
                .fatal(
                    "0A000",
                    &format!(
                        "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                        version >> 16,
                        version & 0xffff
                    ),
                )
                .await;
            return;
        }
        let unsupported: Vec<&str> = params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.as_str())
            .collect();
        if version != PROTOCOL_3_0 || !unsupported.is_empty() {
            client.send(&wire::negotiate_protocol_version(&unsupported));
        }
        if cfg.tls.required && !client.stream.is_tls() {
            client
                .fatal("28000", "meridian-pgproxy requires TLS (sslmode=require) for every connection")
                .await;
            return;
        }
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if get("replication").is_some_and(|v| !matches!(v.as_str(), "false" | "off" | "0" | "no")) {
            client
                .fatal("0A000", "replication connections are not supported through meridian-pgproxy; connect to the node directly")
                .await;
            return;
        }
        let Some(user) = get("user").filter(|u| !u.is_empty()) else {
            client.fatal("28000", "no PostgreSQL user name specified in startup packet").await;
            return;
        };
        let database = get("database").filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());

        let Some(_guard) = shared.admit_client(cfg.max_clients) else {
            shared.metrics().error("53300");
            client.fatal("53300", "sorry, too many clients already").await;
            return;
        };

        let user_cfg = cfg.user(&user).cloned();
        if let Err(e) = auth::authenticate(&mut client, &user, user_cfg.as_ref(), cfg.auth).await {
            info!(user = %user, error = %e, "authentication failed");
            shared.metrics().error(e.sqlstate());
            client.fatal(e.sqlstate(), &e.to_string()).await;
            return;
        }
        if let Some(u) = &user_cfg {
            if !u.databases.is_empty() && !u.databases.contains(&database) {
                client
                    .fatal("28000", &format!("user \"{user}\" may not connect to database \"{database}\""))
                    .await;
                return;
            }
        } else if cfg.auth != AuthMethod::Trust {
            client.fatal("28000", &format!("user \"{user}\" is not configured")).await;
            return;
        }

        let login = Login {
            backend_user: user_cfg.as_ref().and_then(|u| u.backend_user.clone()).unwrap_or_else(|| user.clone()),
            backend_password: user_cfg
                .as_ref()
                .and_then(|u| u.backend_password.clone().or_else(|| u.password.clone())),
            mode: user_cfg.as_ref().and_then(|u| u.pool_mode).unwrap_or(cfg.pool.mode),
            startup_params: params
                .iter()
                .filter(|(k, _)| REPLAYED_PARAMS.contains(&k.to_ascii_lowercase().as_str()))
                .cloned()
                .collect(),
            user,
            database,
        };
        enter_session(client, shared, login).await;
    }
    .instrument(span)
    .await
}

/// Hands an authenticated client to its session.
async fn enter_session<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    client: ClientConn<S>,
    shared: Arc<Shared>,
    login: Login,
) {
    let connector = PoolConnector::new(
        shared.clone(),
        login.backend_user.clone(),
        login.database.clone(),
        login.backend_password.clone(),
        rand::random(),
    );
    if let Err(e) = crate::session::login::serve(shared, client, login, connector).await {
        debug!(error = %e, "session ended with an error");
    }
}
