//! `meridian-coordinator`: parses the command line (flags, environment
//! variables `MERIDIAN_COORDINATOR_<FLAG>`, then the `--config` file),
//! initialises telemetry, binds the QUIC endpoint, connects to etcd and runs
//! the decision loop ([`meridian_coordinator::daemon::run`]) next to the admin
//! API and the HTTP server until SIGTERM or SIGINT, which resigns the election
//! and exits 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meridian_coordinator::{admin, control, daemon, http};
use meridian_shared::keys::{validate_name, Keys};
use meridian_shared::pki::{quic_server_config, PkiPaths};
use meridian_shared::records::{self, CoordinatorRecord};
use tokio::sync::watch;

/// The only decider of a Meridian cluster: elected through etcd, receives the
/// agents' heartbeats over QUIC, detects failure, fails over, publishes the leader.
#[derive(Debug, Parser)]
#[command(name = "meridian-coordinator", version)]
struct Args {
    /// TOML file of these settings, keys named like the flags (`etcd =
    /// ["http://etcd-1:2379"]`, `quic-listen = "0.0.0.0:7400"`); a flag or its
    /// environment variable overrides the file.
    #[arg(long, env = "MERIDIAN_COORDINATOR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// This coordinator's name (unique among the cluster's coordinators).
    #[arg(long, env = "MERIDIAN_COORDINATOR_NAME")]
    name: String,
    /// Cluster name: keys live under /meridian/<cluster>/.
    #[arg(long, env = "MERIDIAN_COORDINATOR_CLUSTER", default_value = "meridian")]
    cluster: String,
    /// etcd client URLs, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(
        long,
        env = "MERIDIAN_COORDINATOR_ETCD",
        value_delimiter = ',',
        required = true
    )]
    etcd: Vec<String>,
    /// UDP address of the QUIC server agents connect to.
    #[arg(
        long,
        env = "MERIDIAN_COORDINATOR_QUIC_LISTEN",
        default_value = "0.0.0.0:7400"
    )]
    quic_listen: SocketAddr,
    /// QUIC address published in the election [default: --quic-listen with 0.0.0.0 replaced by 127.0.0.1].
    #[arg(long, env = "MERIDIAN_COORDINATOR_ADVERTISE_QUIC")]
    advertise_quic: Option<String>,
    /// QUIC address at which agents of REGION reach this coordinator, as
    /// REGION=HOST:PORT, repeatable (comma-separated in the environment), e.g. a
    /// per-region WAN link or a per-network address. Published in the election
    /// record's `quic_addrs`; an agent of a region not listed dials
    /// --advertise-quic. Default: none.
    #[arg(
        long,
        env = "MERIDIAN_COORDINATOR_ADVERTISE_QUIC_FOR",
        value_delimiter = ',',
        value_name = "REGION=HOST:PORT"
    )]
    advertise_quic_for: Vec<String>,
    /// gRPC admin API listen address.
    #[arg(
        long,
        env = "MERIDIAN_COORDINATOR_ADMIN_LISTEN",
        default_value = "127.0.0.1:7401"
    )]
    admin_listen: SocketAddr,
    /// Admin address published in the election [default: --admin-listen with 0.0.0.0 replaced by 127.0.0.1].
    #[arg(long, env = "MERIDIAN_COORDINATOR_ADVERTISE_ADMIN")]
    advertise_admin: Option<String>,
    /// HTTP listen address (/health, /metrics, status page).
    #[arg(
        long,
        env = "MERIDIAN_COORDINATOR_HTTP_LISTEN",
        default_value = "127.0.0.1:7402"
    )]
    http_listen: SocketAddr,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "MERIDIAN_COORDINATOR_CA")]
    ca: PathBuf,
    /// This coordinator's certificate (PEM; SANs must include meridian-coordinator).
    #[arg(long, env = "MERIDIAN_COORDINATOR_CERT")]
    cert: PathBuf,
    /// This coordinator's private key (PEM).
    #[arg(long, env = "MERIDIAN_COORDINATOR_KEY")]
    key: PathBuf,
    /// TTL of the election lease: a crashed active coordinator is replaced after about this long.
    #[arg(long, env = "MERIDIAN_COORDINATOR_ELECTION_TTL", default_value = "2s", value_parser = humantime::parse_duration)]
    election_ttl: Duration,
    /// Timeout of the coordinator's own probe of the primary's PostgreSQL.
    #[arg(long, env = "MERIDIAN_COORDINATOR_PROBE_TIMEOUT", default_value = "300ms", value_parser = humantime::parse_duration)]
    probe_timeout: Duration,
    /// Planned switchover: wait this long after writing failing_over (proxies stop
    /// starting write transactions) before fencing the old primary.
    #[arg(long, env = "MERIDIAN_COORDINATOR_SWITCHOVER_DRAIN", default_value = "300ms", value_parser = humantime::parse_duration)]
    switchover_drain: Duration,
    /// Re-send a command that was not acknowledged within this time.
    #[arg(long, env = "MERIDIAN_COORDINATOR_COMMAND_RETRY", default_value = "1s", value_parser = humantime::parse_duration)]
    command_retry: Duration,
}

/// `--advertise-quic-for` as the election record's `quic_addrs`; errors name the flag.
fn advertised_quic_for(args: &Args) -> anyhow::Result<BTreeMap<String, String>> {
    records::parse_locality_addrs(&args.advertise_quic_for)
        .map_err(|e| anyhow::anyhow!("--advertise-quic-for: {e}"))
}

/// Idle timeout of agent connections (docs/control-path.md: 3 s).
const QUIC_IDLE: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    meridian_shared::telemetry::init();
    let args: Args = meridian_shared::flag_file::parse();
    validate_name(&args.name).context("--name")?;
    validate_name(&args.cluster).context("--cluster")?;
    if args.election_ttl < Duration::from_secs(1) {
        anyhow::bail!("--election-ttl must be at least 1s (etcd leases have whole seconds)");
    }
    if args.command_retry.is_zero() {
        anyhow::bail!("--command-retry must be greater than 0");
    }

    let quic_addrs = advertised_quic_for(&args)?;

    let pki = PkiPaths {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
    };
    let server_config = quic_server_config(&pki, QUIC_IDLE).context("--ca/--cert/--key")?;
    let endpoint = quinn::Endpoint::server(server_config, args.quic_listen)
        .with_context(|| format!("--quic-listen {}: cannot bind", args.quic_listen))?;
    let quic_addr = args
        .advertise_quic
        .clone()
        .unwrap_or_else(|| daemon::advertise_default(args.quic_listen));
    let admin_addr = args
        .advertise_admin
        .clone()
        .unwrap_or_else(|| daemon::advertise_default(args.admin_listen));

    let etcd = etcd_client::Client::connect(
        &args.etcd,
        Some(
            etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(Duration::from_secs(5)),
        ),
    )
    .await
    .with_context(|| format!("--etcd {}: cannot connect", args.etcd.join(",")))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let signal_stop = stop_tx.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; shutting down");
        let _ = signal_stop.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let (handle, loop_side) = control::channel();
    let settings = daemon::Settings {
        name: args.name.clone(),
        cluster: args.cluster.clone(),
        record: CoordinatorRecord {
            name: args.name.clone(),
            admin_addr,
            quic_addr,
            quic_addrs,
        },
        election_ttl: args.election_ttl,
        probe_timeout: args.probe_timeout,
        switchover_drain: args.switchover_drain,
        command_retry: args.command_retry,
    };
    tracing::info!(name = %args.name, cluster = %args.cluster, quic = %args.quic_listen, "meridian-coordinator starting");

    let decision = daemon::run(settings, etcd.clone(), endpoint, loop_side, stop_rx.clone());
    let admin = admin::serve_admin(
        handle.clone(),
        etcd,
        Keys::new(&args.cluster),
        args.admin_listen,
        stopped(stop_rx.clone()),
    );
    let web = http::serve_http(handle, args.http_listen, stopped(stop_rx.clone()));
    // A server that fails (e.g. cannot bind) stops the whole process.
    let stop_admin = stop_tx.clone();
    let admin = async move {
        let result = admin.await;
        if result.is_err() {
            let _ = stop_admin.send(true);
        }
        result
    };
    let stop_web = stop_tx.clone();
    let web = async move {
        let result = web.await;
        if result.is_err() {
            let _ = stop_web.send(true);
        }
        result
    };
    let (decision, admin, web) = tokio::join!(decision, admin, web);
    admin.context("admin API")?;
    web.context("HTTP server")?;
    decision.context("decision loop")?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec![
            "meridian-coordinator",
            "--name",
            "c1",
            "--etcd",
            "http://127.0.0.1:2379",
            "--ca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "c.key",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn advertise_quic_for_is_repeatable_and_comma_separated() {
        assert!(parse(&[]).unwrap().advertise_quic_for.is_empty());
        let args = parse(&[
            "--advertise-quic-for",
            "us-east=127.0.0.1:7000",
            "--advertise-quic-for",
            "eu-west=127.0.0.1:7001,us-west=127.0.0.1:7002",
        ])
        .unwrap();
        let map = advertised_quic_for(&args).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map["eu-west"], "127.0.0.1:7001");
        for bad in ["eu-west", "=127.0.0.1:1", "eu-west=nohost", "eu=h:1,eu=h:2"] {
            let args = parse(&["--advertise-quic-for", bad]).unwrap();
            let err = advertised_quic_for(&args).unwrap_err().to_string();
            assert!(err.starts_with("--advertise-quic-for: "), "{bad}: {err}");
        }
    }
}
