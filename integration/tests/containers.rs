#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Container tests: a three-region Meridian cluster from the locally built
//! images (`deploy/build-images.sh`, tag `MERIDIAN_TAG` or `dev`) on a Docker
//! network of its own, started with testcontainers: etcd, one coordinator, one
//! node per region (us-east bootstraps, the others clone it) and one pgproxy
//! per region, published on a host port. Configured like `deploy/docker-compose.yml`
//! minus the WAN delay links and Redis; the PEMs are minted on the host
//! (`write_dev_pki`) and bind-mounted.
//!
//! - `round_trip_through_every_region`: write and read back through each proxy.
//! - `docker_kill_of_the_primary_fails_over`: `docker kill` of the primary's
//!   container, a new leader, writes through another region succeed again.
//! - `partitioned_primary_is_fenced`: `docker network disconnect` of the
//!   primary: its Postgres stops accepting writes, a new primary is elected.
//!
//! Without a reachable Docker engine, or without the images, each test fails,
//! saying why and how to build them (nothing is ever pulled);
//! `integration/run-tests.sh` leaves this binary out where Docker is missing. Every container and the network are
//! removed at the end, also when a test fails.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use meridian_integration::containers::{
    docker, docker_unreachable, image_tag, new_run_id, pg_accepts_writes, require_images, RunGuard,
    StatusView, RUN_LABEL,
};
use meridian_integration::eventually;
use testcontainers::core::{AccessMode, ExecCommand, IntoContainerPort, Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// (region, Postgres port of its node), us-east first: it bootstraps.
const REGIONS: [(&str, u16); 3] = [("us-east", 5432), ("us-west", 5433), ("eu-west", 5434)];
const CLUSTER: &str = "tc";

/// From `docker run` to a serving primary with two streaming replicas.
const SETTLE: Duration = Duration::from_secs(240);
/// From an injected failure to a new serving leader.
const FAILOVER: Duration = Duration::from_secs(120);
/// For a write (and its read-back) through a proxy to succeed.
const WRITE: Duration = Duration::from_secs(90);

fn node_name(region: &str) -> String {
    format!("node-{region}")
}

fn region_of(node: &str) -> &str {
    node.strip_prefix("node-").unwrap_or(node)
}

fn pg_port(region: &str) -> u16 {
    REGIONS
        .iter()
        .find(|(r, _)| *r == region)
        .map(|(_, p)| *p)
        .expect("known region")
}

/// The image tag; panics without a Docker engine or without the images. A test that
/// cannot run fails rather than passes: `integration/run-tests.sh` leaves this binary
/// out, and says so, where no engine is reachable.
fn preflight(test: &str) -> String {
    if let Some(reason) = docker_unreachable() {
        panic!(
            "no Docker engine reachable ({reason}): containers::{test} needs one \
             (integration/run-tests.sh leaves these tests out where Docker is missing)"
        );
    }
    let tag = image_tag();
    if let Err(e) = require_images(&tag) {
        panic!("{e:#}");
    }
    tag
}

struct Cluster {
    id: String,
    coordinator: ContainerAsync<GenericImage>,
    /// region → its pgproxy's host port
    proxy_ports: Vec<(String, u16)>,
    // Dropped (removed) after the fields above are no longer needed; order
    // does not matter for correctness.
    _nodes: Vec<ContainerAsync<GenericImage>>,
    _proxies: Vec<ContainerAsync<GenericImage>>,
    _etcd: ContainerAsync<GenericImage>,
    _certs: tempfile::TempDir,
}

impl Cluster {
    fn container(&self, what: &str) -> String {
        format!("{}-{what}", self.id)
    }

    fn etcd_url(&self) -> String {
        format!("http://{}:2379", self.container("etcd"))
    }

    async fn start(id: &str, tag: &str) -> anyhow::Result<Cluster> {
        let certs = tempfile::Builder::new()
            .prefix("meridian-tc-certs")
            .tempdir()?;
        let names = [
            "node-us-east",
            "node-us-west",
            "node-eu-west",
            "coordinator-1",
        ];
        meridian_shared::pki::write_dev_pki(certs.path(), &names)?;
        // The containers run as uids 999 and 10001: the test's throwaway keys
        // are made readable to them (the compose demo uses a group instead).
        std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755))?;
        for entry in std::fs::read_dir(certs.path())? {
            std::fs::set_permissions(entry?.path(), std::fs::Permissions::from_mode(0o644))?;
        }
        let certs_dir = certs.path().to_string_lossy().into_owned();
        let hba = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo/pg_hba.conf");
        let hba = std::fs::canonicalize(&hba).with_context(|| format!("{}", hba.display()))?;
        let certs_mount =
            || Mount::bind_mount(&certs_dir, "/certs").with_access_mode(AccessMode::ReadOnly);

        let name = |what: &str| format!("{id}-{what}");
        let etcd_host = name("etcd");
        let etcd_url = format!("http://{etcd_host}:2379");
        let base = |image: &str, what: &str, wait: WaitFor| {
            GenericImage::new(format!("meridian/{image}"), tag.to_owned())
                .with_wait_for(wait)
                .with_network(id)
                .with_container_name(name(what))
                .with_label(RUN_LABEL, id)
                .with_env_var("RUST_LOG", "info")
                .with_env_var("MERIDIAN_LOG_FORMAT", "plain")
                .with_env_var("NO_COLOR", "1")
                .with_startup_timeout(Duration::from_secs(90))
        };

        let etcd = base("etcd", "etcd", WaitFor::healthcheck())
            .with_env_var("ETCD_NAME", "etcd-1")
            .with_env_var(
                "ETCD_INITIAL_CLUSTER",
                format!("etcd-1=http://{etcd_host}:2380"),
            )
            .with_env_var("ETCD_INITIAL_CLUSTER_STATE", "new")
            .with_env_var("ETCD_INITIAL_CLUSTER_TOKEN", id)
            .with_env_var("ETCD_LISTEN_CLIENT_URLS", "http://0.0.0.0:2379")
            .with_env_var("ETCD_LISTEN_PEER_URLS", "http://0.0.0.0:2380")
            .with_env_var("ETCD_ADVERTISE_CLIENT_URLS", &etcd_url)
            .with_env_var(
                "ETCD_INITIAL_ADVERTISE_PEER_URLS",
                format!("http://{etcd_host}:2380"),
            )
            .with_env_var("ETCD_HEARTBEAT_INTERVAL", "100")
            .with_env_var("ETCD_ELECTION_TIMEOUT", "1000")
            .start()
            .await
            .context("starting the etcd container")?;

        let coord = name("coordinator");
        let coordinator = base("coordinator", "coordinator", WaitFor::Nothing)
            .with_env_var("MERIDIAN_COORDINATOR_NAME", "coordinator-1")
            .with_env_var("MERIDIAN_COORDINATOR_CLUSTER", CLUSTER)
            .with_env_var("MERIDIAN_COORDINATOR_ETCD", &etcd_url)
            .with_env_var(
                "MERIDIAN_COORDINATOR_ADVERTISE_QUIC",
                format!("{coord}:7400"),
            )
            .with_env_var(
                "MERIDIAN_COORDINATOR_ADVERTISE_ADMIN",
                format!("{coord}:7401"),
            )
            .with_env_var("MERIDIAN_COORDINATOR_CA", "/certs/ca.pem")
            .with_env_var("MERIDIAN_COORDINATOR_CERT", "/certs/coordinator-1.pem")
            .with_env_var("MERIDIAN_COORDINATOR_KEY", "/certs/coordinator-1-key.pem")
            .with_mount(certs_mount())
            .start()
            .await
            .context("starting the coordinator container")?;

        let mut nodes = Vec::new();
        for (region, port) in REGIONS {
            let node = node_name(region);
            let mut req = base("node", &node, WaitFor::Nothing)
                .with_env_var("MERIDIAN_AGENT_NAME", &node)
                .with_env_var("MERIDIAN_AGENT_REGION", region)
                .with_env_var("MERIDIAN_AGENT_CLUSTER", CLUSTER)
                .with_env_var("MERIDIAN_AGENT_ETCD", &etcd_url)
                .with_env_var("MERIDIAN_AGENT_PG_PORT", port.to_string())
                .with_env_var(
                    "MERIDIAN_AGENT_ADVERTISE_PG_ADDR",
                    format!("{}:{port}", name(&node)),
                )
                .with_env_var("MERIDIAN_AGENT_CA", "/certs/ca.pem")
                .with_env_var("MERIDIAN_AGENT_CERT", format!("/certs/{node}.pem"))
                .with_env_var("MERIDIAN_AGENT_KEY", format!("/certs/{node}-key.pem"))
                .with_env_var(
                    "MERIDIAN_AGENT_PG_SETTING",
                    format!("cluster_name={node},hba_file=/etc/meridian/pg_hba.conf"),
                )
                .with_mount(certs_mount())
                .with_mount(
                    Mount::bind_mount(hba.to_string_lossy(), "/etc/meridian/pg_hba.conf")
                        .with_access_mode(AccessMode::ReadOnly),
                )
                .with_shm_size(128 * 1024 * 1024);
            if region == "us-east" {
                req = req.with_cmd(["--bootstrap"]);
            }
            nodes.push(
                req.start()
                    .await
                    .with_context(|| format!("starting {node}"))?,
            );
        }

        let mut proxies = Vec::new();
        let mut proxy_ports = Vec::new();
        for (region, _) in REGIONS {
            let proxy = GenericImage::new("meridian/pgproxy".to_owned(), tag.to_owned())
                .with_exposed_port(6432.tcp())
                .with_network(id)
                .with_container_name(name(&format!("pgproxy-{region}")))
                .with_label(RUN_LABEL, id)
                .with_env_var("RUST_LOG", "info")
                .with_env_var("MERIDIAN_LOG_FORMAT", "plain")
                .with_env_var("NO_COLOR", "1")
                .with_env_var("MERIDIAN_PGPROXY_REGION", region)
                .with_env_var("MERIDIAN_PGPROXY_CLUSTER", CLUSTER)
                .with_env_var("MERIDIAN_PGPROXY_ETCD", &etcd_url)
                .with_env_var("MERIDIAN_PGPROXY_AUTH", "trust")
                .start()
                .await
                .with_context(|| format!("starting pgproxy-{region}"))?;
            let port = proxy.get_host_port_ipv4(6432.tcp()).await?;
            proxy_ports.push((region.to_owned(), port));
            proxies.push(proxy);
        }
        Ok(Cluster {
            id: id.to_owned(),
            coordinator,
            proxy_ports,
            _nodes: nodes,
            _proxies: proxies,
            _etcd: etcd,
            _certs: certs,
        })
    }

    /// `meridianctl status --json`, run inside the coordinator container.
    async fn status(&self) -> anyhow::Result<StatusView> {
        let etcd = self.etcd_url();
        let mut res = self
            .coordinator
            .exec(ExecCommand::new([
                "meridianctl",
                "--etcd",
                etcd.as_str(),
                "--cluster",
                CLUSTER,
                "status",
                "--json",
            ]))
            .await?;
        let out = String::from_utf8_lossy(&res.stdout_to_vec().await?).into_owned();
        let err = String::from_utf8_lossy(&res.stderr_to_vec().await?).into_owned();
        match res.exit_code().await? {
            Some(0) => StatusView::parse(&out),
            code => bail!("meridianctl status exited with {code:?}: {}", err.trim()),
        }
    }

    /// Waits for a serving leader other than `not_leader` at an epoch above
    /// `min_epoch` whose `replicas` stream from it; returns the status.
    async fn settled(
        &self,
        within: Duration,
        min_epoch: u64,
        not_leader: Option<&str>,
        replicas: Option<&[&str]>,
    ) -> anyhow::Result<StatusView> {
        eventually(within, "the cluster to settle", || async {
            let s = self.status().await?;
            let leader = s.leader.clone().unwrap_or_default();
            let others: Vec<String> = REGIONS
                .iter()
                .map(|(r, _)| node_name(r))
                .filter(|n| *n != leader)
                .collect();
            let all: Vec<&str> = others.iter().map(String::as_str).collect();
            s.settled(min_epoch, not_leader, replicas.unwrap_or(&all))
                .map_err(anyhow::Error::msg)?;
            Ok(s)
        })
        .await
    }

    fn proxy_port(&self, region: &str) -> u16 {
        self.proxy_ports
            .iter()
            .find(|(r, _)| r == region)
            .map(|(_, p)| *p)
            .expect("a proxy per region")
    }

    async fn connect(&self, region: &str) -> anyhow::Result<tokio_postgres::Client> {
        let port = self.proxy_port(region);
        let conf =
            format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5");
        let (client, conn) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(&conf, tokio_postgres::NoTls),
        )
        .await
        .context("connect timed out")?
        .with_context(|| format!("connecting to pgproxy-{region} at 127.0.0.1:{port}"))?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Inserts `token` through `region`'s proxy (creating the table if needed).
    async fn write(&self, region: &str, token: &str) -> anyhow::Result<()> {
        let client = self.connect(region).await?;
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS tc_notes (id bigserial PRIMARY KEY, region text NOT NULL, msg text NOT NULL); \
             INSERT INTO tc_notes (region, msg) VALUES ('{region}', '{token}')"
        );
        tokio::time::timeout(Duration::from_secs(15), client.batch_execute(&sql))
            .await
            .context("write timed out")?
            .with_context(|| format!("writing through pgproxy-{region}"))?;
        Ok(())
    }

    /// The rows of `tc_notes` whose msg is one of `tokens`, read through `region`'s proxy.
    async fn read(&self, region: &str, tokens: &[String]) -> anyhow::Result<Vec<String>> {
        let client = self.connect(region).await?;
        let list = tokens
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!("SELECT msg FROM tc_notes WHERE msg IN ({list}) ORDER BY msg");
        let rows = tokio::time::timeout(Duration::from_secs(15), client.simple_query(&sql))
            .await
            .context("read timed out")?
            .with_context(|| format!("reading through pgproxy-{region}"))?;
        Ok(rows
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect())
    }

    /// Writes `token` through `region`'s proxy and reads it back there.
    async fn write_and_read_back(&self, region: &str, token: &str) -> anyhow::Result<()> {
        eventually(WRITE, &format!("a write through pgproxy-{region}"), || {
            self.write(region, token)
        })
        .await?;
        let want = vec![token.to_owned()];
        eventually(
            WRITE,
            &format!("the read-back through pgproxy-{region}"),
            || async {
                let got = self.read(region, &want).await?;
                anyhow::ensure!(got == want, "read {got:?}");
                Ok(())
            },
        )
        .await
    }

    /// `select pg_is_in_recovery()` on `region`'s node, from inside its container.
    async fn pg_in_recovery(&self, region: &str) -> anyhow::Result<String> {
        let container = self.container(&node_name(region));
        let port = pg_port(region).to_string();
        docker(&[
            "exec",
            "-e",
            "PGCONNECT_TIMEOUT=3",
            &container,
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            "select pg_is_in_recovery()",
        ])
        .await
    }

    /// Prints the status and each container's last log lines (on failure).
    async fn diagnose(&self) {
        match self.status().await {
            Ok(s) => eprintln!("--- status: {s:?}"),
            Err(e) => eprintln!("--- status unavailable: {e:#}"),
        }
        let mut names = vec!["etcd".to_owned(), "coordinator".to_owned()];
        names.extend(REGIONS.iter().map(|(r, _)| node_name(r)));
        names.extend(REGIONS.iter().map(|(r, _)| format!("pgproxy-{r}")));
        for n in names {
            let c = self.container(&n);
            // The images log to stderr: both streams, interleaved as docker stored them.
            let out = tokio::process::Command::new("docker")
                .args(["logs", "--tail", "30", &c])
                .output()
                .await;
            eprintln!("--- {c} (last 30 lines)");
            match out {
                Ok(o) => {
                    eprint!("{}", String::from_utf8_lossy(&o.stdout));
                    eprint!("{}", String::from_utf8_lossy(&o.stderr));
                }
                Err(e) => eprintln!("docker logs {c}: {e}"),
            }
        }
    }
}

/// Starts a cluster for `test`, runs `body` on it once it settled, prints
/// diagnostics and panics if either fails. Everything is removed afterwards.
async fn with_cluster<F>(test: &str, body: F)
where
    F: for<'a> FnOnce(
        &'a Cluster,
        StatusView,
    ) -> futures::future::LocalBoxFuture<'a, anyhow::Result<()>>,
{
    let tag = preflight(test);
    let id = new_run_id(test);
    // Declared first: dropped last, after testcontainers removed its containers.
    let _guard = RunGuard::new(&id);
    let started = std::time::Instant::now();
    let cluster = match Cluster::start(&id, &tag).await {
        Ok(c) => c,
        Err(e) => panic!("starting the container cluster {id}: {e:#}"),
    };
    let result = async {
        let status = cluster.settled(SETTLE, 0, None, None).await?;
        eprintln!(
            "{test}: cluster {id} serving after {:?}: leader {:?}, epoch {}",
            started.elapsed(),
            status.leader,
            status.epoch
        );
        body(&cluster, status).await
    }
    .await;
    if let Err(e) = result {
        cluster.diagnose().await;
        panic!("{test} failed: {e:#}");
    }
    eprintln!("{test}: passed after {:?}", started.elapsed());
}

fn token(what: &str) -> String {
    format!("{what}-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_every_region() {
    with_cluster("round_trip", |c, _status| {
        Box::pin(async move {
            let mut tokens = Vec::new();
            for (region, _) in REGIONS {
                let t = token(region);
                c.write_and_read_back(region, &t).await?;
                tokens.push(t);
            }
            tokens.sort();
            // Every region eventually sees every region's write (replication).
            for (region, _) in REGIONS {
                eventually(
                    WRITE,
                    &format!("all writes visible through pgproxy-{region}"),
                    || async {
                        let got = c.read(region, &tokens).await?;
                        anyhow::ensure!(got == tokens, "read {got:?}, want {tokens:?}");
                        Ok(())
                    },
                )
                .await?;
            }
            Ok(())
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_of_the_primary_fails_over() {
    with_cluster("kill_primary", |c, status| {
        Box::pin(async move {
            let old = status.leader.clone().context("no leader")?;
            let container = c.container(&old);
            docker(&["kill", &container]).await?;
            let running = docker(&["inspect", "-f", "{{.State.Running}}", &container]).await?;
            anyhow::ensure!(
                running.trim() == "false",
                "{container} still running after docker kill"
            );
            let after = c
                .settled(FAILOVER, status.epoch, Some(&old), Some(&[]))
                .await
                .with_context(|| format!("failover away from the killed {old}"))?;
            let new = after.leader.clone().context("no leader")?;
            eprintln!(
                "kill_primary: {old} killed, new leader {new} at epoch {}",
                after.epoch
            );
            assert_ne!(new, old);
            assert!(after.epoch > status.epoch);
            // Writes through a region other than the dead primary's succeed again.
            let region = REGIONS
                .iter()
                .map(|(r, _)| *r)
                .find(|r| *r != region_of(&old))
                .context("another region")?;
            c.write_and_read_back(region, &token("after-kill")).await?;
            // The new primary really is writable.
            let accepts = c.pg_in_recovery(region_of(&new)).await;
            anyhow::ensure!(
                pg_accepts_writes(&accepts),
                "new primary {new}: {accepts:?}"
            );
            Ok(())
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_primary_is_fenced() {
    with_cluster("partition", |c, status| {
        Box::pin(async move {
            let old = status.leader.clone().context("no leader")?;
            let old_region = region_of(&old).to_owned();
            let before = c.pg_in_recovery(&old_region).await;
            anyhow::ensure!(
                pg_accepts_writes(&before),
                "the primary {old} should accept writes before the partition: {before:?}"
            );
            let container = c.container(&old);
            docker(&["network", "disconnect", &c.id, &container]).await?;
            eprintln!("partition: {container} disconnected from {}", c.id);
            eventually(FAILOVER, &format!("{old} to fence itself"), || async {
                let out = c.pg_in_recovery(&old_region).await;
                anyhow::ensure!(
                    !pg_accepts_writes(&out),
                    "{old} still accepts writes: {out:?}"
                );
                Ok(())
            })
            .await?;
            let after = c
                .settled(FAILOVER, status.epoch, Some(&old), Some(&[]))
                .await
                .with_context(|| format!("failover away from the partitioned {old}"))?;
            let new = after.leader.clone().context("no leader")?;
            eprintln!(
                "partition: {old} fenced, new leader {new} at epoch {}",
                after.epoch
            );
            assert_ne!(new, old);
            let region = region_of(&new).to_owned();
            c.write_and_read_back(&region, &token("after-partition"))
                .await?;
            let still = c.pg_in_recovery(&old_region).await;
            anyhow::ensure!(
                !pg_accepts_writes(&still),
                "{old} accepts writes again while partitioned: {still:?}"
            );
            Ok(())
        })
    })
    .await;
}
