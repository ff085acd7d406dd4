//! Client authentication: SCRAM-SHA-256 (default), md5 and trust, per user.
//!
//! The SCRAM exchange is pgwire's `ScramServerAuth` state machine, fed either a
//! `pg_authid`-style verifier from config (the proxy never sees the password)
//! or a salted password derived from a configured cleartext password. md5
//! uses postgres-protocol's hash. Failures are reported with SQLSTATE 28P01
//! (wrong password) or 28000 (no such user / method not allowed).
//!
//! Nothing the client sends during the exchange (a password, a SASL mechanism
//! name, a SCRAM nonce or proof) ever reaches an [`AuthError`]'s text: the
//! errors carry fixed messages only, because the caller logs them and a client
//! that sends its password in the wrong field must not have it written to a log.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use meridian_shared::config::{AuthMethod, UserConfig};
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramSecret, ScramServerAuth};
use pgwire::messages::startup::Authentication;
use pgwire::messages::Message;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::client::{ClientConn, ClientError};
use crate::wire::{self, Frame};

const SCRAM_ITERATIONS: usize = 4096;

/// Why a client was not let in.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    BadPassword(String),
    #[error("{0}")]
    Rejected(String),
    /// A fixed description: never text the client sent.
    #[error("authentication protocol violation: {0}")]
    Protocol(&'static str),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::BadPassword(_) => "28P01",
            AuthError::Rejected(_) => "28000",
            AuthError::Protocol(_) => "08P01",
            AuthError::Client(_) => "08006",
        }
    }
}

fn send_auth<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
    msg: Authentication,
) -> Result<(), AuthError> {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf)
        .map_err(|_| AuthError::Protocol("cannot encode an authentication message"))?;
    client.send_raw(&buf);
    Ok(())
}

async fn read_password_message<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
) -> Result<Frame, AuthError> {
    client.flush().await?;
    let f = client.read_frame().await?;
    if f.tag != b'p' {
        return Err(AuthError::Protocol("expected a password message"));
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

/// Runs the authentication exchange for `user` and sends `AuthenticationOk`.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
    user_name: &str,
    user: Option<&UserConfig>,
    default_method: AuthMethod,
) -> Result<(), AuthError> {
    let method = user.and_then(|u| u.auth).unwrap_or(default_method);
    match (method, user) {
        (AuthMethod::Trust, _) => {}
        (_, None) => {
            // Do not reveal whether the user exists: run the same exchange and fail.
            return Err(AuthError::BadPassword(user_name.to_owned()));
        }
        (AuthMethod::Md5, Some(u)) => md5(client, user_name, u).await?,
        (AuthMethod::ScramSha256, Some(u)) => scram(client, user_name, u).await?,
    }
    send_auth(client, Authentication::Ok)?;
    Ok(())
}

async fn md5<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
    user_name: &str,
    user: &UserConfig,
) -> Result<(), AuthError> {
    let password = user.password.as_deref().ok_or_else(|| {
        AuthError::Rejected(format!("md5 is not possible for user \"{user_name}\""))
    })?;
    let salt: [u8; 4] = rand::random();
    send_auth(client, Authentication::MD5Password(salt.to_vec()))?;
    let f = read_password_message(client).await?;
    let mut body = f.body();
    let given =
        wire::read_cstr(&mut body).ok_or(AuthError::Protocol("malformed password message"))?;
    let expected = postgres_protocol::authentication::md5_hash(
        user_name.as_bytes(),
        password.as_bytes(),
        salt,
    );
    if given != expected {
        return Err(AuthError::BadPassword(user_name.to_owned()));
    }
    Ok(())
}

async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
    user_name: &str,
    user: &UserConfig,
) -> Result<(), AuthError> {
    let secret = match (&user.scram_verifier, &user.password) {
        (Some(v), _) => parse_scram_verifier(v).ok_or_else(|| {
            AuthError::Rejected(format!("invalid SCRAM verifier for user \"{user_name}\""))
        })?,
        (None, Some(pw)) => {
            let salt: [u8; 16] = rand::random();
            ScramSecret::SaltedPassword {
                salt: salt.to_vec(),
                salted_password: gen_salted_password(pw, &salt, SCRAM_ITERATIONS),
            }
        }
        (None, None) => {
            return Err(AuthError::Rejected(format!(
                "no credentials for user \"{user_name}\""
            )))
        }
    };
    send_auth(
        client,
        Authentication::SASL(vec!["SCRAM-SHA-256".to_owned()]),
    )?;
    let first = read_password_message(client).await?;
    let mut body = first.body();
    let mechanism = wire::read_cstr(&mut body)
        .ok_or(AuthError::Protocol("malformed SASLInitialResponse message"))?;
    if mechanism != "SCRAM-SHA-256" {
        // The name is the client's: it may be anything, a password included.
        return Err(AuthError::Protocol(
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    if body.len() < 4 {
        return Err(AuthError::Protocol("malformed SASLInitialResponse message"));
    }
    let len = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let data = body
        .get(4..)
        .filter(|d| len >= 0 && d.len() == len as usize)
        .ok_or(AuthError::Protocol("malformed SASLInitialResponse message"))?;
    let server = ScramServerAuth::new();
    let mut server = server;
    server.set_iterations(SCRAM_ITERATIONS);
    let (server_first, waiting) = server
        .on_client_first_message_with_secret(data, secret)
        .map_err(|_| AuthError::Protocol("malformed SCRAM client-first message"))?;
    send_auth(
        client,
        Authentication::SASLContinue(Bytes::from(server_first)),
    )?;
    let fin = read_password_message(client).await?;
    let server_final = waiting
        .on_client_final_message(fin.body())
        .map_err(|_| AuthError::BadPassword(user_name.to_owned()))?;
    send_auth(client, Authentication::SASLFinal(Bytes::from(server_final)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use tokio::io::AsyncWriteExt;

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
        let login = authenticate(&mut conn, "app", Some(&user), AuthMethod::ScramSha256);
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
        assert_eq!(e.sqlstate(), "08P01");
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "{text}");
    }

    #[tokio::test]
    async fn a_malformed_client_first_message_never_reaches_the_error_text() {
        // Not a SCRAM client-first message at all: the password itself.
        let e = scram_login_with(sasl_initial("SCRAM-SHA-256", SECRET.as_bytes())).await;
        assert_eq!(e.sqlstate(), "08P01");
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "{text}");
    }

    #[tokio::test]
    async fn a_password_sent_in_place_of_the_password_message_never_reaches_the_error_text() {
        // A cleartext password in a message of the wrong type.
        let mut body = SECRET.as_bytes().to_vec();
        body.push(0);
        let e = scram_login_with(Frame::new(b'Q', &body).raw.to_vec()).await;
        assert_eq!(e.sqlstate(), "08P01");
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "{text}");
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
