//! TLS on both sides of the proxy, with rustls and the ring provider.
//!
//! Towards clients: an acceptor built from the configured PEM certificate and
//! key. Towards backends: libpq-like modes — `disable`, `prefer` and `require`
//! (encrypted, certificate not verified, as libpq does for these modes), and
//! `verify-full` (chain checked against the configured CA, host name checked).

use std::path::Path;
use std::sync::Arc;

use meridian_shared::config::{BackendTlsConfig, BackendTlsMode, ClientTlsConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.display().to_string(),
            message: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    rustls_pemfile::private_key(&mut &data[..])
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            message: e.to_string(),
        })?
        .ok_or_else(|| TlsError::Pem {
            path: path.display().to_string(),
            message: "no private key found".into(),
        })
}

/// Builds the client-facing acceptor, if TLS is configured.
pub fn acceptor(cfg: &ClientTlsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
        return Ok(None);
    };
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// TLS towards backends, per the configured mode.
pub struct BackendTls {
    mode: BackendTlsMode,
    connector: Option<TlsConnector>,
}

impl BackendTls {
    pub fn disabled() -> Arc<BackendTls> {
        Arc::new(BackendTls {
            mode: BackendTlsMode::Disable,
            connector: None,
        })
    }

    pub fn from_config(cfg: &BackendTlsConfig) -> Result<Arc<BackendTls>, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let config = match cfg.mode {
            BackendTlsMode::Disable => return Ok(Self::disabled()),
            BackendTlsMode::Prefer | BackendTlsMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth(),
            BackendTlsMode::VerifyFull => {
                let mut roots = rustls::RootCertStore::empty();
                if let Some(ca) = &cfg.ca_file {
                    for cert in load_certs(ca)? {
                        roots.add(cert)?;
                    }
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        Ok(Arc::new(BackendTls {
            mode: cfg.mode,
            connector: Some(TlsConnector::from(Arc::new(config))),
        }))
    }

    pub fn connector(&self) -> Option<&TlsConnector> {
        self.connector.as_ref()
    }

    /// True unless the mode falls back to plaintext when the server refuses TLS.
    pub fn required(&self) -> bool {
        matches!(
            self.mode,
            BackendTlsMode::Require | BackendTlsMode::VerifyFull
        )
    }
}

/// The `prefer`/`require` verifier: checks handshake signatures, not the chain
/// (libpq's semantics for these modes: encryption without authentication).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
