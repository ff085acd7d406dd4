//! Client authentication: SCRAM-SHA-256 (default), md5 and trust, per user.
//!
//! The SCRAM exchange is pgwire's `ScramServerAuth` state machine, fed stored keys:
//! a `pg_authid`-style verifier from config (the proxy never sees the password), or
//! keys derived from a configured cleartext password. Deriving them costs PBKDF2 with
//! 4096 rounds, so it happens once per (user, password) — when the configuration is
//! loaded or reloaded ([`ScramKeys::prepare`]), or at the first login on a blocking
//! thread — never per login attempt on an async worker ([`ScramKeys`]).
//!
//! No user enumeration: a user that is not configured gets the exchange a configured
//! one gets — a SCRAM exchange with a salt derived from the user name and a per-process
//! secret (PostgreSQL's `scram_mock_salt`), or an md5 challenge — and fails at its end
//! with the 28P01 a wrong password gets. Cleartext-password users use the same salt
//! derivation, so their salts and an unknown user's look alike too.
//!
//! Every message the client sends before it is authenticated is limited to
//! `max_auth_message` bytes, refused (08P01) as soon as its length field is read.
//!
//! Nothing the client sends during the exchange (a password, a SASL mechanism name, a
//! SCRAM nonce or proof) ever reaches an [`AuthError`]'s text: the errors are
//! [`ProxyError`]s with fixed messages, because the caller logs them and a client that
//! sends its password in the wrong field must not have it written to a log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use meridian_shared::config::{AuthMethod, ProxyConfig, UserConfig};
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramSecret, ScramServerAuth};
use pgwire::messages::startup::Authentication;
use pgwire::messages::Message;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OnceCell;
use tracing::warn;

use crate::client::{ClientConn, ClientError};
use crate::error::{ProxyError, SqlState};
use crate::wire::{self, Frame, WireError};

/// Iterations of the keys derived from configured passwords (PostgreSQL's default).
pub const SCRAM_ITERATIONS: usize = 4096;
/// Salt length of derived keys and mock exchanges (PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`).
const SALT_LEN: usize = 16;
/// `SCRAM-SHA-256` key length.
const KEY_LEN: usize = 32;

/// Why a client was not let in.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The client is refused with this error (sent as a FATAL).
    #[error("{0}")]
    Refused(ProxyError),
    /// The client left, or its connection broke, during the exchange.
    #[error(transparent)]
    Gone(ClientError),
}

impl AuthError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            AuthError::Refused(e) => e.sqlstate(),
            AuthError::Gone(_) => SqlState::ConnectionFailure,
        }
    }
}

impl From<ProxyError> for AuthError {
    fn from(e: ProxyError) -> Self {
        AuthError::Refused(e)
    }
}

/// The keys a SCRAM login is checked against, as in a `pg_authid` verifier.
#[derive(Clone)]
struct StoredKeys {
    salt: Vec<u8>,
    iterations: usize,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl StoredKeys {
    fn secret(&self) -> ScramSecret {
        ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations,
            stored_key: self.stored_key.clone(),
            server_key: self.server_key.clone(),
        }
    }

    /// PBKDF2 (`SCRAM_ITERATIONS` rounds) of `password`: the expensive part. Blocking.
    fn derive(password: &str, salt: Vec<u8>) -> StoredKeys {
        let salted = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
        match ScramSecret::verifier_from_salted_password(salt, salted, SCRAM_ITERATIONS) {
            ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            } => StoredKeys {
                salt,
                iterations,
                stored_key,
                server_key,
            },
            // pgwire builds a verifier from a salted password; nothing else comes back.
            ScramSecret::SaltedPassword { salt, .. } => StoredKeys::doomed(salt),
        }
    }

    /// Keys no proof matches (random), for a mock exchange.
    fn doomed(salt: Vec<u8>) -> StoredKeys {
        StoredKeys {
            salt,
            iterations: SCRAM_ITERATIONS,
            stored_key: rand::random::<[u8; KEY_LEN]>().to_vec(),
            server_key: rand::random::<[u8; KEY_LEN]>().to_vec(),
        }
    }
}

/// (user name, configured password).
type KeyId = (String, String);

/// SCRAM keys derived from configured cleartext passwords, each derived once, and the
/// per-process secret of mock exchanges. The proxy uses [`ScramKeys::global`].
pub struct ScramKeys {
    mock_secret: [u8; 32],
    keys: Mutex<HashMap<KeyId, Arc<OnceCell<StoredKeys>>>>,
    derivations: AtomicU64,
}

impl Default for ScramKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl ScramKeys {
    pub fn new() -> ScramKeys {
        ScramKeys {
            mock_secret: rand::random(),
            keys: Mutex::default(),
            derivations: AtomicU64::new(0),
        }
    }

    /// The process's keys (one mock secret per process, like PostgreSQL's per cluster).
    pub fn global() -> &'static ScramKeys {
        static KEYS: LazyLock<ScramKeys> = LazyLock::new(ScramKeys::new);
        &KEYS
    }

    /// How many PBKDF2 derivations this store has run.
    pub fn derivations(&self) -> u64 {
        self.derivations.load(Ordering::Relaxed)
    }

    /// The salt of `user`: a hash of the user name and the per-process secret, the same
    /// for configured and unknown users.
    pub fn salt_for(&self, user: &str) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(self.mock_secret);
        h.update(user.as_bytes());
        h.finalize()[..SALT_LEN].to_vec()
    }

    fn cell(&self, id: &KeyId) -> Arc<OnceCell<StoredKeys>> {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_default()
            .clone()
    }

    /// Derives the keys of every SCRAM user of `cfg` configured with a cleartext
    /// password that are not derived yet, and forgets those of users or passwords no
    /// longer configured. Blocking (PBKDF2): call it where the configuration is loaded,
    /// off the async workers.
    pub fn prepare(&self, cfg: &ProxyConfig) {
        let wanted: Vec<KeyId> = cfg
            .users
            .iter()
            .filter(|u| u.auth.unwrap_or(cfg.auth) == AuthMethod::ScramSha256)
            .filter(|u| u.scram_verifier.is_none())
            .filter_map(|u| Some((u.name.clone(), u.password.clone()?)))
            .collect();
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| wanted.contains(id));
        for id in wanted {
            let cell = self.cell(&id);
            if cell.initialized() {
                continue;
            }
            let keys = StoredKeys::derive(&id.1, self.salt_for(&id.0));
            self.derivations.fetch_add(1, Ordering::Relaxed);
            // A login that derived it meanwhile wins; the result is the same.
            let _ = cell.set(keys);
        }
    }

    /// The keys of `user` with `password`: cached, or derived once on a blocking
    /// thread (concurrent logins wait for the same derivation).
    async fn keys(&self, user: &str, password: &str) -> StoredKeys {
        let id = (user.to_owned(), password.to_owned());
        let cell = self.cell(&id);
        let salt = self.salt_for(user);
        cell.get_or_init(|| async {
            let password = password.to_owned();
            let fallback = salt.clone();
            let keys = tokio::task::spawn_blocking(move || StoredKeys::derive(&password, salt))
                .await
                .unwrap_or_else(|_| StoredKeys::doomed(fallback));
            self.derivations.fetch_add(1, Ordering::Relaxed);
            keys
        })
        .await
        .clone()
    }
}

fn send_auth<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
    msg: Authentication,
) -> Result<(), AuthError> {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf)
        .map_err(|_| ProxyError::AuthProtocol("cannot encode an authentication message"))?;
    client.send_raw(&buf);
    Ok(())
}

/// Sends `AuthenticationOk` (buffered): the caller decides when the client is in.
pub fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
) -> Result<(), AuthError> {
    send_auth(client, Authentication::Ok)
}

/// Maps a failed read or flush during the exchange.
fn exchange_error(e: ClientError) -> AuthError {
    match e {
        ClientError::TimedOut => AuthError::Refused(ProxyError::LoginTimeout),
        ClientError::Wire(WireError::TooLarge { .. }) => {
            AuthError::Refused(ProxyError::AuthMessageTooLong)
        }
        ClientError::Wire(_) => {
            AuthError::Refused(ProxyError::AuthProtocol("invalid message length"))
        }
        other => AuthError::Gone(other),
    }
}

async fn read_password_message<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
    max_message: usize,
) -> Result<Frame, AuthError> {
    client.flush().await.map_err(exchange_error)?;
    let f = client
        .read_frame_limited(max_message)
        .await
        .map_err(exchange_error)?;
    if f.tag != b'p' {
        return Err(ProxyError::AuthProtocol("expected a password message").into());
    }
    Ok(f)
}

/// Parses `SCRAM-SHA-256$<iterations>:<salt>:<storedkey>:<serverkey>`.
pub fn parse_scram_verifier(v: &str) -> Option<ScramSecret> {
    let rest = v.strip_prefix("SCRAM-SHA-256$")?;
    let (iter_salt, keys) = rest.split_once('$')?;
    let (iterations, salt) = iter_salt.split_once(':')?;
    let (stored, server) = keys.split_once(':')?;
    Some(ScramSecret::Verifier {
        salt: STANDARD.decode(salt).ok()?,
        iterations: iterations.parse().ok()?,
        stored_key: STANDARD.decode(stored).ok()?,
        server_key: STANDARD.decode(server).ok()?,
    })
}

/// What [`authenticate`] needs besides the user.
pub struct AuthSettings<'a> {
    /// The method of users without their own (`auth`).
    pub default_method: AuthMethod,
    /// `max_auth_message`.
    pub max_message: usize,
    pub keys: &'a ScramKeys,
}

/// Runs the authentication exchange for `user_name` (`user`: its configuration, if
/// configured). Sends nothing on success: [`accept`] does.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
    user_name: &str,
    user: Option<&UserConfig>,
    settings: &AuthSettings<'_>,
) -> Result<(), AuthError> {
    let method = user.and_then(|u| u.auth).unwrap_or(settings.default_method);
    let max = settings.max_message;
    match method {
        AuthMethod::Trust => Ok(()),
        AuthMethod::Md5 => {
            md5(
                client,
                user_name,
                user.and_then(|u| u.password.as_deref()),
                max,
            )
            .await
        }
        AuthMethod::ScramSha256 => {
            // `None`: no such user (or no usable credentials): a mock exchange.
            let keys = match user {
                Some(u) => scram_keys(u, settings.keys).await,
                None => None,
            };
            let doomed = keys.is_none();
            let secret = keys
                .unwrap_or_else(|| StoredKeys::doomed(settings.keys.salt_for(user_name)).secret());
            scram(client, user_name, secret, doomed, max).await
        }
    }
}

/// The secret a configured SCRAM user is checked against.
async fn scram_keys(user: &UserConfig, keys: &ScramKeys) -> Option<ScramSecret> {
    match (&user.scram_verifier, &user.password) {
        (Some(v), _) => {
            let parsed = parse_scram_verifier(v);
            if parsed.is_none() {
                // A configuration error: the client gets what a wrong password gets.
                warn!(user = %user.name, "invalid scram_verifier: every login of this user fails");
            }
            parsed
        }
        (None, Some(pw)) => Some(keys.keys(&user.name, pw).await.secret()),
        (None, None) => None,
    }
}

/// The md5 exchange; `password: None` (unknown user) runs it and fails at its end.
async fn md5<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
    user_name: &str,
    password: Option<&str>,
    max_message: usize,
) -> Result<(), AuthError> {
    let salt: [u8; 4] = rand::random();
    send_auth(client, Authentication::MD5Password(salt.to_vec()))?;
    let f = read_password_message(client, max_message).await?;
    let mut body = f.body();
    let given =
        wire::read_cstr(&mut body).ok_or(ProxyError::AuthProtocol("malformed password message"))?;
    let matches = password.is_some_and(|pw| {
        given
            == postgres_protocol::authentication::md5_hash(
                user_name.as_bytes(),
                pw.as_bytes(),
                salt,
            )
    });
    if !matches {
        return Err(password_failed(user_name));
    }
    Ok(())
}

fn password_failed(user_name: &str) -> AuthError {
    AuthError::Refused(ProxyError::PasswordFailed {
        user: user_name.to_owned(),
    })
}

/// The SCRAM exchange against `secret`; `doomed` (a mock exchange) fails at its end
/// whatever the client proves.
async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
    user_name: &str,
    secret: ScramSecret,
    doomed: bool,
    max_message: usize,
) -> Result<(), AuthError> {
    send_auth(
        client,
        Authentication::SASL(vec!["SCRAM-SHA-256".to_owned()]),
    )?;
    let first = read_password_message(client, max_message).await?;
    let mut body = first.body();
    let mechanism = wire::read_cstr(&mut body).ok_or(ProxyError::AuthProtocol(
        "malformed SASLInitialResponse message",
    ))?;
    if mechanism != "SCRAM-SHA-256" {
        // The name is the client's: it may be anything, a password included.
        return Err(ProxyError::AuthProtocol(
            "client selected an invalid SASL authentication mechanism",
        )
        .into());
    }
    if body.len() < 4 {
        return Err(ProxyError::AuthProtocol("malformed SASLInitialResponse message").into());
    }
    let len = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let data = body
        .get(4..)
        .filter(|d| len >= 0 && d.len() == len as usize)
        .ok_or(ProxyError::AuthProtocol(
            "malformed SASLInitialResponse message",
        ))?;
    let mut server = ScramServerAuth::new();
    server.set_iterations(SCRAM_ITERATIONS);
    let (server_first, waiting) = server
        .on_client_first_message_with_secret(data, secret)
        .map_err(|_| ProxyError::AuthProtocol("malformed SCRAM client-first message"))?;
    send_auth(
        client,
        Authentication::SASLContinue(Bytes::from(server_first)),
    )?;
    let fin = read_password_message(client, max_message).await?;
    let verdict = waiting.on_client_final_message(fin.body());
    match verdict {
        Ok(server_final) if !doomed => {
            send_auth(client, Authentication::SASLFinal(Bytes::from(server_final)))?;
            Ok(())
        }
        _ => Err(password_failed(user_name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const SECRET: &str = "correct-horse-battery-staple";

    fn scram_user() -> UserConfig {
        UserConfig {
            name: "app".to_owned(),
            password: Some(SECRET.to_owned()),
            scram_verifier: None,
            auth: Some(AuthMethod::ScramSha256),
            backend_user: None,
            backend_password: None,
            pool_mode: None,
            databases: Vec::new(),
        }
    }

    fn settings(keys: &ScramKeys) -> AuthSettings<'_> {
        AuthSettings {
            default_method: AuthMethod::ScramSha256,
            max_message: 8192,
            keys,
        }
    }

    /// A `SASLInitialResponse` naming `mechanism` with `data`.
    fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_slice(mechanism.as_bytes());
        body.put_u8(0);
        body.put_i32(data.len() as i32);
        body.put_slice(data);
        Frame::new(b'p', &body).raw.to_vec()
    }

    /// Runs a SCRAM login whose client sends `first` after the server's
    /// AuthenticationSASL; returns the server's verdict.
    async fn scram_login_with(first: Vec<u8>) -> AuthError {
        let (server, mut client) = tokio::io::duplex(64 * 1024);
        let mut conn = ClientConn::new(server, 1 << 20);
        let user = scram_user();
        let keys = ScramKeys::new();
        let settings = settings(&keys);
        let login = authenticate(&mut conn, "app", Some(&user), &settings);
        let send = async move {
            client.write_all(&first).await.unwrap();
            client
        };
        let (verdict, _client) = tokio::join!(login, send);
        verdict.unwrap_err()
    }

    #[tokio::test]
    async fn a_password_sent_as_the_sasl_mechanism_never_reaches_the_error_text() {
        let e = scram_login_with(sasl_initial(SECRET, b"n,,n=,r=abc")).await;
        assert_eq!(e.sqlstate(), SqlState::ProtocolViolation);
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "{text}");
    }

    #[tokio::test]
    async fn a_malformed_client_first_message_never_reaches_the_error_text() {
        // Not a SCRAM client-first message at all: the password itself.
        let e = scram_login_with(sasl_initial("SCRAM-SHA-256", SECRET.as_bytes())).await;
        assert_eq!(e.sqlstate(), SqlState::ProtocolViolation);
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "{text}");
    }

    #[tokio::test]
    async fn a_password_sent_in_place_of_the_password_message_never_reaches_the_error_text() {
        // A cleartext password in a message of the wrong type.
        let mut body = SECRET.as_bytes().to_vec();
        body.push(0);
        let e = scram_login_with(Frame::new(b'Q', &body).raw.to_vec()).await;
        assert_eq!(e.sqlstate(), SqlState::ProtocolViolation);
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "{text}");
    }

    /// Reads one backend message: (tag, body).
    async fn read_msg(peer: &mut DuplexStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        peer.read_exact(&mut head).await.unwrap();
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        peer.read_exact(&mut body).await.unwrap();
        (head[0], body)
    }

    /// What a client saw of one SCRAM login, with the random parts blanked: the
    /// authentication codes, the server-first message's shape, and the verdict.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Flow {
        codes: Vec<i32>,
        mechanisms: Vec<u8>,
        /// `r=` length, `s=` (salt), `i=` of the server-first message.
        nonce_len: usize,
        salt: String,
        iterations: String,
        verdict: Result<(), (SqlState, String)>,
    }

    /// A real SCRAM client (postgres-protocol's, as tokio-postgres uses) logging in
    /// as `user_name` with `password`.
    async fn scram_flow(
        keys: &ScramKeys,
        user_name: &str,
        user: Option<&UserConfig>,
        password: &str,
    ) -> Flow {
        let (server, mut peer) = tokio::io::duplex(64 * 1024);
        let mut conn = ClientConn::new(server, 1 << 20);
        let settings = settings(keys);
        let password = password.to_owned();
        let client = async move {
            let (tag, sasl) = read_msg(&mut peer).await;
            assert_eq!(tag, b'R');
            let mut codes = vec![i32::from_be_bytes(sasl[..4].try_into().unwrap())];
            let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
            peer.write_all(&sasl_initial("SCRAM-SHA-256", scram.message()))
                .await
                .unwrap();
            let (_, cont) = read_msg(&mut peer).await;
            codes.push(i32::from_be_bytes(cont[..4].try_into().unwrap()));
            let server_first = String::from_utf8(cont[4..].to_vec()).unwrap();
            scram.update(server_first.as_bytes()).unwrap();
            peer.write_all(&Frame::new(b'p', scram.message()).raw)
                .await
                .unwrap();
            (codes, sasl[4..].to_vec(), server_first, peer)
        };
        let (verdict, (codes, mechanisms, server_first, _peer)) =
            tokio::join!(authenticate(&mut conn, user_name, user, &settings), client);
        let attr = |k: &str| {
            server_first
                .split(',')
                .find_map(|a| a.strip_prefix(k))
                .unwrap()
                .to_owned()
        };
        Flow {
            codes,
            mechanisms,
            nonce_len: attr("r=").len(),
            salt: attr("s="),
            iterations: attr("i="),
            verdict: verdict.map_err(|e| match e {
                AuthError::Refused(e) => (e.sqlstate(), e.message()),
                other => panic!("{other:?}"),
            }),
        }
    }

    #[tokio::test]
    async fn an_unknown_user_gets_the_exchange_a_wrong_password_gets() {
        let keys = ScramKeys::new();
        // Two names of one length, so even the message lengths match.
        let mut app = scram_user();
        app.name = "ann".into();
        let ok = scram_flow(&keys, "ann", Some(&app), SECRET).await;
        assert_eq!(ok.verdict, Ok(()));
        let wrong = scram_flow(&keys, "ann", Some(&app), "guess").await;
        let unknown = scram_flow(&keys, "bob", None, "guess").await;
        assert_eq!(wrong.codes, vec![10, 11]);
        assert_eq!(
            wrong.verdict,
            Err((
                SqlState::InvalidPassword,
                "password authentication failed for user \"ann\"".into()
            ))
        );
        let blank = |f: &Flow| Flow {
            salt: "x".repeat(f.salt.len()),
            verdict: f
                .verdict
                .clone()
                .map_err(|(s, m)| (s, m.replace("bob", "ann"))),
            ..f.clone()
        };
        assert_eq!(blank(&unknown), blank(&wrong));
        // The mock salt is the user's own and stable, as a configured user's is.
        assert_eq!(wrong.salt, ok.salt);
        let again = scram_flow(&keys, "bob", None, "other").await;
        assert_eq!(again.salt, unknown.salt);
        assert_ne!(unknown.salt, wrong.salt);
    }

    #[tokio::test]
    async fn a_configured_password_is_derived_once_not_per_login() {
        let keys = ScramKeys::new();
        let user = scram_user();
        for password in [SECRET, "wrong", SECRET] {
            scram_flow(&keys, "app", Some(&user), password).await;
        }
        assert_eq!(keys.derivations(), 1, "one PBKDF2 for three logins");
        // Concurrent first logins share one derivation.
        let fresh = ScramKeys::new();
        let logins = (0..4).map(|_| scram_flow(&fresh, "app", Some(&user), SECRET));
        for f in futures::future::join_all(logins).await {
            assert_eq!(f.verdict, Ok(()));
        }
        assert_eq!(fresh.derivations(), 1);

        // Loading a configuration derives ahead of any login; a reload derives only
        // what changed and forgets the old password.
        let cfg = |pw: &str| {
            let mut u = scram_user();
            u.password = Some(pw.to_owned());
            ProxyConfig {
                users: vec![u],
                ..Default::default()
            }
        };
        let loaded = ScramKeys::new();
        loaded.prepare(&cfg(SECRET));
        assert_eq!(loaded.derivations(), 1);
        assert_eq!(
            scram_flow(&loaded, "app", Some(&user), SECRET)
                .await
                .verdict,
            Ok(())
        );
        loaded.prepare(&cfg(SECRET));
        assert_eq!(loaded.derivations(), 1);
        loaded.prepare(&cfg("rotated"));
        assert_eq!(loaded.derivations(), 2);
        assert_eq!(loaded.keys.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_unknown_md5_user_is_challenged_and_fails_like_a_wrong_password() {
        let keys = ScramKeys::new();
        let md5_settings = AuthSettings {
            default_method: AuthMethod::Md5,
            ..settings(&keys)
        };
        for user in ["nobody", "app"] {
            let (server, mut peer) = tokio::io::duplex(4096);
            let mut conn = ClientConn::new(server, 1 << 20);
            let mut cfg = scram_user();
            cfg.auth = None;
            let configured = (user == "app").then_some(&cfg);
            let client = async move {
                let (tag, body) = read_msg(&mut peer).await;
                assert_eq!((tag, &body[..4]), (b'R', &5i32.to_be_bytes()[..]));
                peer.write_all(&Frame::new(b'p', b"md5000000\0").raw)
                    .await
                    .unwrap();
                peer
            };
            let (verdict, _peer) = tokio::join!(
                authenticate(&mut conn, user, configured, &md5_settings),
                client
            );
            match verdict.unwrap_err() {
                AuthError::Refused(e) => assert_eq!(
                    e,
                    ProxyError::PasswordFailed {
                        user: user.to_owned()
                    }
                ),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_auth_message_over_the_limit_is_refused_from_its_length_alone() {
        let (server, mut peer) = tokio::io::duplex(4096);
        let mut conn = ClientConn::new(server, 1 << 30);
        let keys = ScramKeys::new();
        let user = scram_user();
        let settings = settings(&keys);
        let client = async move {
            let _ = read_msg(&mut peer).await;
            // A SASLInitialResponse announcing 1 GiB; the body never comes.
            peer.write_all(&[b'p', 0x3f, 0xff, 0xff, 0xc0])
                .await
                .unwrap();
            peer
        };
        let (verdict, _peer) = tokio::join!(
            authenticate(&mut conn, "app", Some(&user), &settings),
            client
        );
        match verdict.unwrap_err() {
            AuthError::Refused(e) => {
                assert_eq!(e, ProxyError::AuthMessageTooLong);
                assert_eq!(e.sqlstate(), SqlState::ProtocolViolation);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn verifier_parses() {
        let v = "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$c3RvcmVk:c2VydmVy";
        match parse_scram_verifier(v).unwrap() {
            ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            } => {
                assert_eq!(salt, b"saltsalt");
                assert_eq!(iterations, 4096);
                assert_eq!(stored_key, b"stored");
                assert_eq!(server_key, b"server");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse_scram_verifier("md5abc").is_none());
        assert!(parse_scram_verifier("SCRAM-SHA-256$x:y$z").is_none());
    }
}
