//! How `meridianctl` finds the coordinator to talk to.
//!
//! Order: `--admin ADDR` (used as given) > `--dir DIR` (each coordinator of
//! `DIR/cluster.json` is asked for its status; the active one is used, else the
//! active address a standby names) > `--etcd URLS --cluster NAME` (the admin
//! address in the election leader's `CoordinatorRecord`). Each flag has an
//! environment variable (`MERIDIANCTL_ADMIN`, `MERIDIANCTL_DIR`,
//! `MERIDIANCTL_ETCD`, `MERIDIANCTL_CLUSTER`). Connecting times out after 2 s;
//! when nothing answers, the error names everything that was tried.

use std::path::PathBuf;
use std::time::Duration;

use meridian_shared::keys::Keys;
use meridian_shared::records::{self, CoordinatorRecord};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use super::CtlError;
use crate::admin::proto::admin_client::AdminClient;
use crate::admin::proto::{ClusterStatus, GetStatusRequest};

/// Connect timeout for every address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The connection settings, after flags and environment were merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub admin: Option<String>,
    pub dir: Option<PathBuf>,
    pub etcd: Vec<String>,
    pub cluster: Option<String>,
}

/// Where to look, in the order above.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Admin(String),
    Dir(PathBuf),
    Etcd { urls: Vec<String>, cluster: String },
}

/// Chooses how to find the coordinator (pure).
pub fn plan(target: &Target) -> Result<Plan, CtlError> {
    if let Some(admin) = target.admin.as_ref().filter(|a| !a.trim().is_empty()) {
        return Ok(Plan::Admin(admin.trim().to_string()));
    }
    if let Some(dir) = &target.dir {
        return Ok(Plan::Dir(dir.clone()));
    }
    let urls: Vec<String> = target
        .etcd
        .iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if !urls.is_empty() {
        let cluster = target
            .cluster
            .as_ref()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                CtlError::Usage("--etcd needs --cluster NAME (or MERIDIANCTL_CLUSTER)".into())
            })?;
        meridian_shared::keys::validate_name(cluster)
            .map_err(|e| CtlError::Usage(format!("--cluster: {e}")))?;
        return Ok(Plan::Etcd {
            urls,
            cluster: cluster.clone(),
        });
    }
    Err(CtlError::Usage(
        "no cluster given: use --admin ADDR, --dir DIR, or --etcd URLS with --cluster NAME \
         (or MERIDIANCTL_ADMIN / MERIDIANCTL_DIR / MERIDIANCTL_ETCD + MERIDIANCTL_CLUSTER)"
            .into(),
    ))
}

/// What asking one coordinator gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Active,
    /// A standby, with the active admin address it names (empty: unknown).
    Standby {
        active_admin_addr: String,
    },
    Failed(String),
}

/// Among probed addresses (in order), the one to use: the first active one, else
/// an address a standby named that was not probed yet (to be probed next).
pub fn pick(probes: &[(String, Probe)]) -> Pick {
    if let Some((addr, _)) = probes.iter().find(|(_, p)| *p == Probe::Active) {
        return Pick::Use(addr.clone());
    }
    for (_, probe) in probes {
        if let Probe::Standby { active_admin_addr } = probe {
            if !active_admin_addr.is_empty() && !probes.iter().any(|(a, _)| a == active_admin_addr)
            {
                return Pick::TryNext(active_admin_addr.clone());
            }
        }
    }
    Pick::None
}

/// The outcome of [`pick`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pick {
    Use(String),
    TryNext(String),
    None,
}

/// `host:port` (or a URL) as a gRPC endpoint URI.
pub fn endpoint_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// A connected client and the address it talks to.
pub struct Connected {
    pub client: AdminClient<Channel>,
    pub addr: String,
}

/// Connects to one admin address (2 s timeout).
pub async fn connect(addr: &str) -> Result<AdminClient<Channel>, String> {
    let endpoint = Endpoint::from_shared(endpoint_uri(addr))
        .map_err(|e| format!("invalid address {addr:?}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| format!("{addr}: connect timed out after {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("{addr}: {}", error_chain(&e)))?;
    Ok(AdminClient::new(channel))
}

/// An error with its sources, `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

async fn probe(addr: &str) -> (Option<AdminClient<Channel>>, Probe) {
    let mut client = match connect(addr).await {
        Ok(c) => c,
        Err(e) => return (None, Probe::Failed(e)),
    };
    let mut req = tonic::Request::new(GetStatusRequest {});
    req.set_timeout(CONNECT_TIMEOUT);
    match client.get_status(req).await {
        Ok(resp) => {
            let status: ClusterStatus = resp.into_inner();
            let probe = if status.active {
                Probe::Active
            } else {
                Probe::Standby {
                    active_admin_addr: status.active_admin_addr,
                }
            };
            (Some(client), probe)
        }
        Err(e) => (None, Probe::Failed(format!("{addr}: {}", e.message()))),
    }
}

fn describe(probes: &[(String, Probe)]) -> String {
    probes
        .iter()
        .map(|(addr, p)| match p {
            Probe::Active => format!("{addr} (active)"),
            Probe::Standby { .. } => format!("{addr} (standby)"),
            Probe::Failed(e) => format!("{addr} ({e})"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Asks each address in turn and connects to the active coordinator.
async fn first_active(addrs: Vec<String>, origin: &str) -> Result<Connected, CtlError> {
    let mut probes: Vec<(String, Probe)> = Vec::new();
    let mut clients = Vec::new();
    let mut queue = addrs;
    queue.reverse();
    loop {
        while let Some(addr) = queue.pop() {
            let (client, result) = probe(&addr).await;
            if result == Probe::Active {
                if let Some(client) = client {
                    return Ok(Connected { client, addr });
                }
            }
            clients.push((addr.clone(), client));
            probes.push((addr, result));
        }
        match pick(&probes) {
            Pick::Use(addr) => {
                // Active but without a client cannot happen (see above); fall through.
                return Err(CtlError::Unreachable(format!(
                    "lost the connection to {addr}"
                )));
            }
            Pick::TryNext(addr) => queue.push(addr),
            Pick::None => break,
        }
    }
    // No active coordinator answered: use a standby for reads rather than nothing.
    if let Some((addr, Some(client))) = clients.into_iter().find(|(_, c)| c.is_some()) {
        return Ok(Connected { client, addr });
    }
    Err(CtlError::Unreachable(format!(
        "cannot reach any coordinator ({origin}); tried: {}",
        if probes.is_empty() {
            "nothing (no coordinators listed)".to_string()
        } else {
            describe(&probes)
        }
    )))
}

/// The election leader's record in etcd.
pub async fn coordinator_from_etcd(
    urls: &[String],
    cluster: &str,
) -> Result<CoordinatorRecord, CtlError> {
    let what = format!("etcd {} (cluster {cluster})", urls.join(","));
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(CONNECT_TIMEOUT);
    let mut etcd = tokio::time::timeout(
        CONNECT_TIMEOUT * 2,
        etcd_client::Client::connect(urls, Some(options)),
    )
    .await
    .map_err(|_| CtlError::Unreachable(format!("{what}: connect timed out")))?
    .map_err(|e| CtlError::Unreachable(format!("{what}: {}", error_chain(&e))))?;
    let election = Keys::new(cluster).coordinator_election();
    let resp = tokio::time::timeout(CONNECT_TIMEOUT * 2, etcd.leader(election.clone()))
        .await
        .map_err(|_| CtlError::Unreachable(format!("{what}: reading the election timed out")))?
        .map_err(|e| {
            let detail = match &e {
                etcd_client::Error::GRpcStatus(s) if s.message().contains("no leader") => {
                    "no active coordinator (the election has no leader)".to_string()
                }
                etcd_client::Error::GRpcStatus(s) if s.code() == Code::Unavailable => {
                    format!("cannot connect: {}", s.message())
                }
                etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
                other => error_chain(other),
            };
            CtlError::Unreachable(format!("{what}: election {election}: {detail}"))
        })?;
    let kv = resp.kv().ok_or_else(|| {
        CtlError::Unreachable(format!(
            "{what}: no active coordinator in election {election}"
        ))
    })?;
    records::decode("coordinator", kv.value())
        .map_err(|e| CtlError::Unreachable(format!("{what}: election {election}: {e}")))
}

/// Finds and connects to the coordinator to talk to.
pub async fn discover(target: &Target) -> Result<Connected, CtlError> {
    match plan(target)? {
        Plan::Admin(addr) => {
            let client = connect(&addr).await.map_err(|e| {
                CtlError::Unreachable(format!("cannot reach the coordinator at --admin {e}"))
            })?;
            Ok(Connected { client, addr })
        }
        Plan::Dir(dir) => {
            let file = meridian_launcher::ClusterFile::load(&dir)
                .map_err(|e| CtlError::Unreachable(format!("--dir: {e}")))?;
            let addrs = file
                .coordinators
                .iter()
                .map(|c| c.admin_addr.clone())
                .collect();
            first_active(
                addrs,
                &format!("from {}", dir.join("cluster.json").display()),
            )
            .await
        }
        Plan::Etcd { urls, cluster } => {
            let record = coordinator_from_etcd(&urls, &cluster).await?;
            first_active(
                vec![record.admin_addr.clone()],
                &format!("coordinator {} named by etcd", record.name),
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_order_is_admin_dir_etcd() {
        let all = Target {
            admin: Some("h:1".into()),
            dir: Some("/d".into()),
            etcd: vec!["http://e:2379".into()],
            cluster: Some("c".into()),
        };
        assert_eq!(plan(&all).unwrap(), Plan::Admin("h:1".into()));
        let no_admin = Target {
            admin: None,
            ..all.clone()
        };
        assert_eq!(plan(&no_admin).unwrap(), Plan::Dir("/d".into()));
        let etcd_only = Target {
            dir: None,
            ..no_admin.clone()
        };
        assert_eq!(
            plan(&etcd_only).unwrap(),
            Plan::Etcd {
                urls: vec!["http://e:2379".into()],
                cluster: "c".into()
            }
        );
        // An empty --admin (e.g. MERIDIANCTL_ADMIN="") does not count.
        let empty_admin = Target {
            admin: Some(" ".into()),
            ..etcd_only.clone()
        };
        assert!(matches!(plan(&empty_admin).unwrap(), Plan::Etcd { .. }));
    }

    #[test]
    fn missing_settings_are_usage_errors() {
        let err = plan(&Target::default()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--admin"));
        let err = plan(&Target {
            etcd: vec!["http://e:2379".into()],
            ..Target::default()
        })
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--cluster"));
        assert!(plan(&Target {
            etcd: vec!["http://e:2379".into()],
            cluster: Some("a/b".into()),
            ..Target::default()
        })
        .is_err());
    }

    #[test]
    fn picks_the_active_then_follows_a_standby_hint() {
        let standby = |a: &str| Probe::Standby {
            active_admin_addr: a.into(),
        };
        assert_eq!(
            pick(&[("a".into(), standby("b")), ("b".into(), Probe::Active)]),
            Pick::Use("b".into())
        );
        assert_eq!(
            pick(&[
                ("a".into(), Probe::Failed("x".into())),
                ("b".into(), standby("c"))
            ]),
            Pick::TryNext("c".into())
        );
        // A hint already tried (it failed) or empty is not retried.
        assert_eq!(
            pick(&[
                ("a".into(), standby("b")),
                ("b".into(), Probe::Failed("down".into()))
            ]),
            Pick::None
        );
        assert_eq!(pick(&[("a".into(), standby(""))]), Pick::None);
        assert_eq!(endpoint_uri("127.0.0.1:5"), "http://127.0.0.1:5");
        assert_eq!(endpoint_uri("https://h:5"), "https://h:5");
    }
}
