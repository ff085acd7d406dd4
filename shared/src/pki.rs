//! The cluster's private PKI for the QUIC link between agents and coordinators:
//! minting a development CA with node certificates (`meridianctl certs`, the local
//! launcher) and turning PEM files into quinn client/server configurations with
//! mutual TLS.
//!
//! Every certificate signed by the cluster CA is trusted by every other part; the
//! CA is the trust boundary. A coordinator presents a certificate whose subject
//! alternative names include [`COORDINATOR_SERVER_NAME`], which is the name agents
//! verify (coordinators move between hosts, so agents do not dial them by host
//! name). Agents present their node name as a SAN. Both sides speak ALPN
//! [`ALPN`]. Building configs creates no socket.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS server name agents verify on the coordinator's certificate.
pub const COORDINATOR_SERVER_NAME: &str = "meridian-coordinator";
/// Application protocol of the agent ↔ coordinator link.
pub const ALPN: &[u8] = b"meridian/1";

/// Something in the PKI could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Where one party's PEM files are: the cluster CA, its certificate, its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PkiPaths {
    /// The layout [`write_dev_pki`] produces: `DIR/ca.pem`, `DIR/NAME.pem`,
    /// `DIR/NAME-key.pem`.
    pub fn in_dir(dir: &Path, name: &str) -> PkiPaths {
        PkiPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        }
    }
}

/// Mints a development CA into `DIR/ca.pem` (+ `ca-key.pem`) and, for each name,
/// a certificate usable as TLS client and server, with SANs: the name,
/// `localhost`, `127.0.0.1` and [`COORDINATOR_SERVER_NAME`]. Overwrites existing
/// files. Keys are written with mode 0600.
pub fn write_dev_pki(dir: &Path, names: &[&str]) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Meridian development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_file(&dir.join("ca.pem"), &ca_cert.pem(), false)?;
    write_file(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    for name in names {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            (*name).to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            COORDINATOR_SERVER_NAME.to_owned(),
        ])?;
        params.distinguished_name.push(DnType::CommonName, *name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        let paths = PkiPaths::in_dir(dir, name);
        write_file(&paths.cert, &cert.pem(), false)?;
        write_file(&paths.key, &key.serialize_pem(), true)?;
    }
    Ok(())
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    fs::write(path, contents).map_err(err)?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = read(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            what: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = read(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| PkiError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?
        .ok_or_else(|| PkiError::Pem {
            path: path.to_path_buf(),
            what: "no private key in file".into(),
        })
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, PkiError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        store.add(cert).map_err(|e| PkiError::Pem {
            path: path.to_path_buf(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(idle_timeout: Duration) -> Result<Arc<quinn::TransportConfig>, PkiError> {
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|e| PkiError::Tls(format!("idle timeout {idle_timeout:?}: {e}")))?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(Some(idle_timeout / 4));
    Ok(Arc::new(transport))
}

/// The coordinator side: requires a client certificate signed by the cluster CA.
/// `idle_timeout` closes a silent connection (keep-alives go out at a quarter of it).
pub fn quic_server_config(
    paths: &PkiPaths,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, PkiError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&paths.ca)?, provider())
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(idle_timeout)?);
    Ok(config)
}

/// The agent side: verifies the coordinator against the cluster CA under
/// [`COORDINATOR_SERVER_NAME`] and presents its own certificate.
pub fn quic_client_config(
    paths: &PkiPaths,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, PkiError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_root_certificates(roots(&paths.ca)?)
        .with_client_auth_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(idle_timeout)?);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_files_load_into_both_configs() {
        let dir = tempfile::tempdir().unwrap();
        write_dev_pki(dir.path(), &["coord-1", "node-1"]).unwrap();
        let server = PkiPaths::in_dir(dir.path(), "coord-1");
        let client = PkiPaths::in_dir(dir.path(), "node-1");
        quic_server_config(&server, Duration::from_secs(2)).unwrap();
        quic_client_config(&client, Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::in_dir(dir.path(), "nobody");
        let err = quic_client_config(&paths, Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[tokio::test]
    async fn mutual_tls_handshake_over_loopback() {
        let dir = tempfile::tempdir().unwrap();
        write_dev_pki(dir.path(), &["coord-1", "node-1"]).unwrap();
        let server_cfg = quic_server_config(
            &PkiPaths::in_dir(dir.path(), "coord-1"),
            Duration::from_secs(5),
        )
        .unwrap();
        let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut recv = conn.accept_uni().await.unwrap();
            recv.read_to_end(64).await.unwrap()
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(
            quic_client_config(
                &PkiPaths::in_dir(dir.path(), "node-1"),
                Duration::from_secs(5),
            )
            .unwrap(),
        );
        let conn = client
            .connect(addr, COORDINATOR_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let mut send = conn.open_uni().await.unwrap();
        send.write_all(b"hello").await.unwrap();
        send.finish().unwrap();
        assert_eq!(accept.await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn a_client_without_a_cluster_certificate_is_refused() {
        let cluster = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        write_dev_pki(cluster.path(), &["coord-1"]).unwrap();
        write_dev_pki(other.path(), &["intruder"]).unwrap();
        let server_cfg = quic_server_config(
            &PkiPaths::in_dir(cluster.path(), "coord-1"),
            Duration::from_secs(5),
        )
        .unwrap();
        let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            if let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        });
        // The intruder trusts the cluster CA (it knows the public cert) but its own
        // certificate is signed by another CA.
        let paths = PkiPaths {
            ca: cluster.path().join("ca.pem"),
            ..PkiPaths::in_dir(other.path(), "intruder")
        };
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client
            .set_default_client_config(quic_client_config(&paths, Duration::from_secs(5)).unwrap());
        let conn = client.connect(addr, COORDINATOR_SERVER_NAME).unwrap().await;
        // TLS 1.3: the client may finish its side before the server rejects the
        // certificate, so the refusal shows either at connect or at first use.
        let refused = match conn {
            Err(_) => true,
            Ok(conn) => conn.accept_uni().await.is_err(),
        };
        assert!(refused, "a foreign certificate was accepted");
    }
}
