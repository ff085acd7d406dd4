//! Client authentication: SCRAM-SHA-256 (default), md5 and trust, per user.
//!
//! The SCRAM exchange is pgwire's `ScramServerAuth` state machine, fed either a
//! `pg_authid`-style verifier from config (the proxy never sees the password)
//! or a salted password derived from a configured cleartext password. md5
//! uses postgres-protocol's hash. Failures are reported with SQLSTATE 28P01
//! (wrong password) or 28000 (no such user / method not allowed), and the
//! password never appears in logs.

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
    #[error("authentication protocol violation: {0}")]
    Protocol(String),
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
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
    client.send_raw(&buf);
    Ok(())
}

async fn read_password_message<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<S>,
) -> Result<Frame, AuthError> {
    client.flush().await?;
    let f = client.read_frame().await?;
    if f.tag != b'p' {
        return Err(AuthError::Protocol(format!(
            "expected a password message, got message type {:?}",
            f.tag as char
        )));
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
    let given = wire::read_cstr(&mut body)
        .ok_or_else(|| AuthError::Protocol("bad password message".into()))?;
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
        .ok_or_else(|| AuthError::Protocol("bad SASLInitialResponse".into()))?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(AuthError::Protocol(format!(
            "unsupported SASL mechanism {mechanism}"
        )));
    }
    if body.len() < 4 {
        return Err(AuthError::Protocol("bad SASLInitialResponse".into()));
    }
    let len = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let data = body
        .get(4..)
        .filter(|d| len >= 0 && d.len() == len as usize)
        .ok_or_else(|| AuthError::Protocol("bad SASLInitialResponse length".into()))?;
    let server = ScramServerAuth::new();
    let mut server = server;
    server.set_iterations(SCRAM_ITERATIONS);
    let (server_first, waiting) = server
        .on_client_first_message_with_secret(data, secret)
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
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
