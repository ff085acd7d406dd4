//! [`LocalCluster`]: a whole Meridian cluster as processes on loopback. etcd (one
//! member, or `etcd_members` forming one cluster), N coordinators, and per region
//! one Postgres node (its agent runs it), one pgproxy and (unless `redis` is off)
//! one `redis-server`. Every node is reached
//! by everybody else through WAN [`Link`]s: one per region of the cluster, each
//! delayed by the one-way [`WanDelays`] delay between that region and the node's
//! (zero within a region). The agent advertises them as `members/<node>.pg_addrs`
//! (`--advertise-pg-addr-for REGION=ADDR`), and its `pg_addr` is the same-region
//! one, so proxies and standbys of region R dial the node through R's link. Each
//! agent reaches etcd through links of its own (one per member), so a test can
//! partition one node from the rest of the cluster (every link of it cut) while a
//! writer still reaches it directly on its real port. etcd sits with the
//! coordinators (see below): an agent's etcd links, and those each region's proxy
//! reaches etcd through, carry the WAN delay between their region and the
//! coordinators'.
//!
//! The coordinators sit in one region (`coordinator_region`, default the first)
//! and the agents' QUIC traffic to them is delayed too: every node has its own
//! [`UdpLink`] to each coordinator, delayed by the WAN delay between the node's
//! region and the coordinators', and each coordinator advertises, per region R,
//! the relay of R's node (`--advertise-quic-for R=ADDR`; a local cluster has one
//! node per region, so the region's relay is its node's). So a partitioned node
//! is also cut off from every coordinator, and no other node is.
//!
//! Dropping a `LocalCluster` kills everything it started (postmasters included,
//! found through their `postmaster.pid`); [`LocalCluster::stop`] does the same
//! gracefully.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use meridian_shared::keys::Keys;
use meridian_shared::pki::{write_dev_pki, PkiPaths};
use meridian_shared::records::{self, ClusterConfig, CoordinatorRecord, LeaderRecord};
use nix::sys::signal::Signal;

use crate::binaries::Binaries;
use crate::cluster_file::{ClusterFile, CoordinatorEntry, NodeEntry, RegionEntry};
use crate::etcd::Etcd;
use crate::ports::{free_port, free_udp_port};
use crate::process::{alive, signal, tail, Proc};
use crate::redis_server::RedisServer;
use crate::wait::eventually;
use crate::wan::WanDelays;
use crate::wanlink::{Link, LinkControl, UdpLink};

/// What to start.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub cluster: String,
    pub dir: PathBuf,
    /// The first region's node bootstraps the cluster (initial primary).
    pub regions: Vec<String>,
    pub coordinators: usize,
    /// Written to etcd's `config` before any coordinator starts.
    pub config: Option<ClusterConfig>,
    /// The agents' etcd lease TTL.
    pub lease_ttl: Duration,
    /// How long to wait for the whole cluster to serve.
    pub ready_timeout: Duration,
    /// One-way delays between pairs of regions (symmetric; a pair not given and
    /// traffic within a region have none). Default none.
    pub wan_delays: WanDelays,
    /// Start a `redis-server` per region and give its URL to the region's agent
    /// (`--redis`). Default true.
    pub redis: bool,
    /// The region the coordinators sit in: the agents' QUIC traffic to them is
    /// delayed by the WAN delay between the agent's region and this one.
    /// Default (`None`): the first region.
    pub coordinator_region: Option<String>,
    /// Extra options for every region's pgproxy (e.g. `--pool-mode transaction`).
    pub proxy_args: Vec<String>,
    /// etcd members (production runs three). Default 1.
    pub etcd_members: usize,
}

impl ClusterSpec {
    pub fn new(dir: &Path, regions: &[&str]) -> ClusterSpec {
        ClusterSpec {
            cluster: "local".into(),
            dir: dir.to_path_buf(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            coordinators: 2,
            config: None,
            // 5 s: an agent fences itself after 4 s without renewal, which a loaded
            // 2-core CI machine must never cause by accident.
            lease_ttl: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(90),
            wan_delays: WanDelays::none(),
            redis: true,
            coordinator_region: None,
            proxy_args: Vec::new(),
            etcd_members: 1,
        }
    }

    /// The region the coordinators sit in: `coordinator_region`, else the first.
    pub fn coordinator_region(&self) -> &str {
        self.coordinator_region
            .as_deref()
            .or(self.regions.first().map(String::as_str))
            .unwrap_or_default()
    }
}

/// One Postgres node and its agent.
pub struct Node {
    pub name: String,
    pub region: String,
    /// The port Postgres really listens on (direct access, bypassing the link).
    pub pg_port: u16,
    pub data_dir: PathBuf,
    pub initial_role: &'static str,
    /// Its own region reaches this node's Postgres through this link (no delay;
    /// the advertised `pg_addr`, also used by the coordinators' probe).
    pub ingress: Link,
    /// Every other region reaches it through its own link, delayed by the WAN
    /// delay between that region and this node's.
    pub region_links: BTreeMap<String, Link>,
    /// This node's agent reaches etcd through these links, one per member.
    pub etcd_links: Vec<Link>,
    /// This node's agent reaches each coordinator's QUIC port through its own
    /// relay (coordinator name -> relay), delayed by the WAN delay between this
    /// node's region and the coordinators'.
    pub quic_links: BTreeMap<String, UdpLink>,
    agent_args: Vec<String>,
    agent: Option<Proc>,
}

impl Node {
    /// The address in `members/<node>` and `leader`.
    pub fn pg_addr(&self) -> String {
        self.ingress.local_addr().to_string()
    }

    /// The address `region` reaches this node's Postgres at
    /// (`members/<node>.pg_addrs[region]`); `pg_addr` for an unknown region.
    pub fn pg_addr_for(&self, region: &str) -> String {
        match self.region_links.get(region) {
            Some(link) => link.local_addr().to_string(),
            None => self.pg_addr(),
        }
    }

    /// Every link in front of this node: the same-region one and each other
    /// region's.
    fn links(&self) -> impl Iterator<Item = &Link> {
        std::iter::once(&self.ingress).chain(self.region_links.values())
    }

    /// A libpq URL straight to this node's Postgres (as the superuser).
    pub fn direct_dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=2",
            self.pg_port
        )
    }

    /// PID of the running postmaster, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Proc::pid)
    }

    /// Cuts this node off: nobody reaches its Postgres through any of its
    /// addresses (every region's link), its agent loses etcd and every
    /// coordinator (its QUIC relays).
    pub fn partition(&self) {
        for link in self.links() {
            link.control().cut();
        }
        for link in &self.etcd_links {
            link.control().cut();
        }
        for relay in self.quic_links.values() {
            relay.control().cut();
        }
    }

    /// Restores every link [`partition`](Self::partition) cut.
    pub fn heal(&self) {
        for link in self.links() {
            link.control().heal();
        }
        for link in &self.etcd_links {
            link.control().heal();
        }
        for relay in self.quic_links.values() {
            relay.control().heal();
        }
    }
}

/// One coordinator process.
pub struct Coordinator {
    pub name: String,
    /// Where it really listens for QUIC (agents reach it through their relays).
    pub quic_addr: String,
    pub admin_addr: String,
    pub http_addr: String,
    args: Vec<String>,
    proc: Option<Proc>,
}

impl Coordinator {
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

/// One region's proxy.
pub struct Proxy {
    pub region: String,
    pub port: u16,
    pub admin_addr: String,
    /// The proxy's way to etcd, one link per member (delayed like its region's
    /// traffic to the coordinators' region).
    pub etcd_links: Vec<Link>,
    proc: Option<Proc>,
}

impl Proxy {
    /// The application's connection string.
    pub fn dsn(&self) -> String {
        format!("postgres://app@127.0.0.1:{}/app", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

/// A running local cluster.
pub struct LocalCluster {
    pub spec: ClusterSpec,
    pub keys: Keys,
    pub bins: Binaries,
    pub etcd: Etcd,
    pub coordinators: Vec<Coordinator>,
    pub nodes: Vec<Node>,
    pub proxies: Vec<Proxy>,
    /// One per region when `spec.redis`.
    pub redis: Vec<RedisServer>,
    certs: PathBuf,
    logs: PathBuf,
}

fn chmod_755(path: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 0755 {}", path.display()))
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

impl LocalCluster {
    /// Starts everything and waits until the cluster serves through every proxy.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<LocalCluster> {
        anyhow::ensure!(!spec.regions.is_empty(), "at least one region is needed");
        spec.wan_delays
            .check_regions(&spec.regions)
            .map_err(|e| anyhow::anyhow!("wan_delays: {e}"))?;
        let coordinator_region = spec.coordinator_region().to_owned();
        anyhow::ensure!(
            spec.regions.contains(&coordinator_region),
            "coordinator_region: unknown region {coordinator_region:?} (the cluster's regions: {})",
            spec.regions.join(",")
        );
        let bins = Binaries::locate()?;
        let dir = spec.dir.clone();
        std::fs::create_dir_all(dir.join("nodes"))
            .with_context(|| format!("creating {}", dir.display()))?;
        chmod_755(&dir)?;
        chmod_755(&dir.join("nodes"))?;
        let logs = dir.join("logs");
        let certs = dir.join("certs");

        let node_names: Vec<String> = spec.regions.iter().map(|r| format!("{r}-1")).collect();
        let coord_names: Vec<String> = (1..=spec.coordinators)
            .map(|i| format!("coord-{i}"))
            .collect();
        let mut pki_names: Vec<&str> = coord_names.iter().map(String::as_str).collect();
        pki_names.extend(node_names.iter().map(String::as_str));
        write_dev_pki(&certs, &pki_names)?;

        let etcd = Etcd::start_members(&dir, spec.etcd_members).await?;
        let keys = Keys::new(&spec.cluster);
        if let Some(config) = &spec.config {
            config.validate()?;
            let mut client = etcd.client().await?;
            client
                .put(keys.config(), records::encode("config", config)?, None)
                .await?;
        }

        let mut cluster = LocalCluster {
            spec: spec.clone(),
            keys,
            bins,
            etcd,
            coordinators: Vec::new(),
            nodes: Vec::new(),
            proxies: Vec::new(),
            redis: Vec::new(),
            certs,
            logs,
        };

        // Each node's relays to each coordinator, made before the coordinators
        // start because they advertise them: region -> coordinator -> relay.
        let mut quic_links: BTreeMap<String, BTreeMap<String, UdpLink>> = BTreeMap::new();
        for name in &coord_names {
            let quic_addr = format!("127.0.0.1:{}", free_udp_port()?);
            let mut advertised = Vec::new();
            for region in &spec.regions {
                let delay = spec.wan_delays.get(region, &coordinator_region);
                let relay = UdpLink::start(
                    "127.0.0.1:0".parse()?,
                    quic_addr.clone(),
                    LinkControl::new(delay, Duration::ZERO),
                )
                .await?;
                advertised.push(format!("{region}={}", relay.local_addr()));
                quic_links
                    .entry(region.clone())
                    .or_default()
                    .insert(name.clone(), relay);
            }
            cluster.spawn_coordinator(name, quic_addr, &advertised)?;
        }
        if spec.redis {
            for region in &spec.regions {
                let server = RedisServer::start(&dir, &cluster.logs, region)
                    .await
                    .map_err(|e| cluster.explain(e))?;
                cluster.redis.push(server);
            }
        }

        for (i, region) in spec.regions.iter().enumerate() {
            let name = format!("{region}-1");
            let node_dir = dir.join("nodes").join(&name);
            std::fs::create_dir_all(&node_dir)?;
            chmod_755(&node_dir)?;
            let pg_port = free_port()?;
            let ingress = Link::start(
                "127.0.0.1:0".parse()?,
                format!("127.0.0.1:{pg_port}"),
                LinkControl::new(Duration::ZERO, Duration::ZERO),
            )
            .await?;
            let mut region_links = BTreeMap::new();
            for other in spec.regions.iter().filter(|r| *r != region) {
                let link = Link::start(
                    "127.0.0.1:0".parse()?,
                    format!("127.0.0.1:{pg_port}"),
                    LinkControl::new(spec.wan_delays.get(other, region), Duration::ZERO),
                )
                .await?;
                region_links.insert(other.clone(), link);
            }
            let etcd_links = cluster.etcd_links(region).await?;
            let pki = PkiPaths::in_dir(&cluster.certs, &name);
            let mut args = vec![
                s("--name"),
                name.clone(),
                s("--region"),
                region.clone(),
                s("--cluster"),
                spec.cluster.clone(),
                s("--etcd"),
                link_urls(&etcd_links),
                s("--data-dir"),
                node_dir.join("data").to_string_lossy().into_owned(),
                s("--pg-port"),
                s(pg_port),
                s("--pg-listen"),
                s("127.0.0.1"),
                s("--advertise-pg-addr"),
                ingress.local_addr().to_string(),
                s("--ca"),
                pki.ca.to_string_lossy().into_owned(),
                s("--cert"),
                pki.cert.to_string_lossy().into_owned(),
                s("--key"),
                pki.key.to_string_lossy().into_owned(),
                s("--lease-ttl"),
                humantime::format_duration(spec.lease_ttl).to_string(),
                s("--http-listen"),
                format!("127.0.0.1:{}", free_port()?),
            ];
            for r in &spec.regions {
                let addr = match region_links.get(r) {
                    Some(link) => link.local_addr(),
                    None => ingress.local_addr(),
                };
                args.push(s("--advertise-pg-addr-for"));
                args.push(format!("{r}={addr}"));
            }
            if let Some(redis) = cluster.redis.iter().find(|r| &r.region == region) {
                args.push(s("--redis"));
                args.push(redis.url());
            }
            // The application database's changes invalidate the cache.
            args.extend([s("--cache-database"), s("app")]);
            if i == 0 {
                args.push(s("--bootstrap"));
            }
            cluster.nodes.push(Node {
                name: name.clone(),
                region: region.clone(),
                pg_port,
                data_dir: node_dir.join("data"),
                initial_role: if i == 0 { "primary" } else { "replica" },
                ingress,
                region_links,
                etcd_links,
                quic_links: quic_links.remove(region).unwrap_or_default(),
                agent_args: args,
                agent: None,
            });
            cluster.start_agent(&name)?;
        }

        let deadline = spec.ready_timeout;
        let first = node_names[0].clone();
        cluster
            .wait_leader(deadline, "the first node to be the serving leader", |l| {
                l.node == first && l.is_serving()
            })
            .await
            .map_err(|e| cluster.explain(e))?;
        cluster
            .create_app_database()
            .await
            .map_err(|e| cluster.explain(e))?;
        for name in node_names.iter().skip(1) {
            cluster
                .wait_streaming(name, deadline)
                .await
                .map_err(|e| cluster.explain(e))?;
        }
        for region in spec.regions.clone() {
            cluster.spawn_proxy(&region).await?;
        }
        for i in 0..cluster.proxies.len() {
            let dsn = cluster.proxies[i].dsn();
            eventually(deadline, &format!("a write through {dsn}"), || {
                let dsn = dsn.clone();
                async move {
                    let client = connect(&dsn).await?;
                    client
                        .simple_query("CREATE TABLE IF NOT EXISTS meridian_launcher_check (x int)")
                        .await?;
                    Ok(())
                }
            })
            .await
            .map_err(|e| cluster.explain(e))?;
        }
        cluster.write_cluster_file()?;
        Ok(cluster)
    }

    /// Starts a coordinator listening for QUIC on `quic_addr`; `advertised` are
    /// its `--advertise-quic-for` values (`REGION=ADDR`).
    fn spawn_coordinator(
        &mut self,
        name: &str,
        quic_addr: String,
        advertised: &[String],
    ) -> anyhow::Result<()> {
        let admin_addr = format!("127.0.0.1:{}", free_port()?);
        let http_addr = format!("127.0.0.1:{}", free_port()?);
        let pki = PkiPaths::in_dir(&self.certs, name);
        let mut args = vec![
            s("--name"),
            s(name),
            s("--cluster"),
            self.spec.cluster.clone(),
            s("--etcd"),
            self.etcd.client_urls(),
            s("--quic-listen"),
            quic_addr.clone(),
            s("--admin-listen"),
            admin_addr.clone(),
            s("--http-listen"),
            http_addr.clone(),
            s("--ca"),
            pki.ca.to_string_lossy().into_owned(),
            s("--cert"),
            pki.cert.to_string_lossy().into_owned(),
            s("--key"),
            pki.key.to_string_lossy().into_owned(),
        ];
        for item in advertised {
            args.push(s("--advertise-quic-for"));
            args.push(item.clone());
        }
        self.coordinators.push(Coordinator {
            name: name.to_owned(),
            quic_addr,
            admin_addr,
            http_addr,
            args,
            proc: None,
        });
        self.restart_coordinator(name)?;
        Ok(())
    }

    /// Starts a stopped (or killed) coordinator again with its original arguments.
    pub fn restart_coordinator(&mut self, name: &str) -> anyhow::Result<u32> {
        let program = self.bins.coordinator.clone();
        let log = self.logs.join(format!("{name}.log"));
        let c = self
            .coordinators
            .iter_mut()
            .find(|c| c.name == name)
            .with_context(|| format!("no coordinator {name}"))?;
        anyhow::ensure!(c.proc.is_none(), "coordinator {name} is running");
        let proc = Proc::spawn(name, &program, &c.args, &[], &log)?;
        let pid = proc.pid();
        c.proc = Some(proc);
        Ok(pid)
    }

    /// Links to each etcd member for an agent or proxy of `region`: etcd sits
    /// with the coordinators, so they carry the delay between the two regions.
    async fn etcd_links(&self, region: &str) -> anyhow::Result<Vec<Link>> {
        let delay = self
            .spec
            .wan_delays
            .get(region, self.spec.coordinator_region());
        let mut links = Vec::new();
        for addr in self.etcd.client_addrs() {
            links.push(
                Link::start(
                    "127.0.0.1:0".parse()?,
                    addr,
                    LinkControl::new(delay, Duration::ZERO),
                )
                .await?,
            );
        }
        Ok(links)
    }

    async fn spawn_proxy(&mut self, region: &str) -> anyhow::Result<()> {
        let port = free_port()?;
        let admin_addr = format!("127.0.0.1:{}", free_port()?);
        let etcd_links = self.etcd_links(region).await?;
        let args = vec![
            s("--listen"),
            format!("127.0.0.1:{port}"),
            s("--admin-listen"),
            admin_addr.clone(),
            s("--auth"),
            s("trust"),
            s("--etcd"),
            link_urls(&etcd_links),
            s("--cluster"),
            self.spec.cluster.clone(),
            s("--region"),
            s(region),
        ];
        let mut args = args;
        // The region's result cache, in the region's Redis (the agents keep its watermarks).
        if let Ok(url) = self.redis_url(region) {
            args.extend([s("--cache-redis"), url, s("--cache-database"), s("app")]);
        }
        args.extend(self.spec.proxy_args.iter().cloned());
        let name = format!("pgproxy-{region}");
        let proc = Proc::spawn(
            &name,
            &self.bins.pgproxy,
            &args,
            &[],
            &self.logs.join(format!("{name}.log")),
        )?;
        self.proxies.push(Proxy {
            region: region.to_owned(),
            port,
            admin_addr,
            etcd_links,
            proc: Some(proc),
        });
        Ok(())
    }

    /// Starts (or restarts) a node's agent with its original arguments.
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<u32> {
        let logs = self.logs.clone();
        let program = self.bins.agent.clone();
        let n = self.node_mut(node)?;
        anyhow::ensure!(n.agent.is_none(), "the agent of {node} is already running");
        let proc = Proc::spawn(
            &format!("agent-{node}"),
            &program,
            &n.agent_args,
            &[],
            &logs.join(format!("agent-{node}.log")),
        )?;
        let pid = proc.pid();
        n.agent = Some(proc);
        Ok(pid)
    }

    /// `kill -9` of a node's agent only (its Postgres keeps running).
    pub async fn kill_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let n = self.node_mut(node)?;
        match n.agent.as_mut() {
            Some(p) => p.kill9().await,
            None => bail!("the agent of {node} is not running"),
        }
        n.agent = None;
        Ok(())
    }

    /// `kill -9` of a node's postmaster; returns its PID.
    pub fn kill_postmaster(&self, node: &str) -> anyhow::Result<u32> {
        let n = self.node(node)?;
        let pid = n
            .postmaster_pid()
            .with_context(|| format!("{node} has no running postmaster"))?;
        signal(pid, Signal::SIGKILL);
        Ok(pid)
    }

    /// `kill -9` of a coordinator.
    pub async fn kill_coordinator(&mut self, name: &str) -> anyhow::Result<()> {
        let c = self
            .coordinators
            .iter_mut()
            .find(|c| c.name == name)
            .with_context(|| format!("no coordinator {name}"))?;
        if let Some(p) = c.proc.as_mut() {
            p.kill9().await;
        }
        c.proc = None;
        Ok(())
    }

    /// Freezes every running coordinator (SIGSTOP): a control plane that stops answering
    /// without closing a connection. [`LocalCluster::resume_coordinators`] undoes it.
    pub fn pause_coordinators(&self) {
        for pid in self.coordinators.iter().filter_map(Coordinator::pid) {
            signal(pid, Signal::SIGSTOP);
        }
    }

    /// Lets the coordinators frozen by [`LocalCluster::pause_coordinators`] run again.
    pub fn resume_coordinators(&self) {
        for pid in self.coordinators.iter().filter_map(Coordinator::pid) {
            signal(pid, Signal::SIGCONT);
        }
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> anyhow::Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    pub fn proxy(&self, region: &str) -> anyhow::Result<&Proxy> {
        self.proxies
            .iter()
            .find(|p| p.region == region)
            .with_context(|| format!("no proxy in region {region}"))
    }

    fn redis_of(&mut self, region: &str) -> anyhow::Result<&mut RedisServer> {
        self.redis
            .iter_mut()
            .find(|r| r.region == region)
            .with_context(|| format!("no redis in region {region} (ClusterSpec.redis off?)"))
    }

    /// `redis://127.0.0.1:PORT` of the region's Redis.
    pub fn redis_url(&self, region: &str) -> anyhow::Result<String> {
        self.redis
            .iter()
            .find(|r| r.region == region)
            .map(RedisServer::url)
            .with_context(|| format!("no redis in region {region} (ClusterSpec.redis off?)"))
    }

    /// Stops the region's Redis (SIGTERM to its PID); its agent keeps the URL.
    pub async fn stop_redis(&mut self, region: &str) -> anyhow::Result<()> {
        self.redis_of(region)?.stop().await;
        Ok(())
    }

    /// Starts the region's stopped Redis again on the same port (empty: no
    /// persistence) and waits until it answers `PING`.
    pub async fn start_redis(&mut self, region: &str) -> anyhow::Result<()> {
        self.redis_of(region)?.start_again().await
    }

    pub async fn etcd_client(&self) -> anyhow::Result<etcd_client::Client> {
        self.etcd.client().await
    }

    /// The `leader` record, if any.
    pub async fn leader(&self) -> anyhow::Result<Option<LeaderRecord>> {
        let mut client = self.etcd_client().await?;
        let resp = client.get(self.keys.leader(), None).await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some(records::decode("leader", kv.value())?)),
        }
    }

    /// The active coordinator's record, from the etcd election.
    pub async fn active_coordinator(&self) -> anyhow::Result<CoordinatorRecord> {
        let mut client = self.etcd_client().await?;
        let resp = client
            .leader(self.keys.coordinator_election())
            .await
            .context("no coordinator is elected")?;
        let kv = resp.kv().context("no coordinator is elected")?;
        Ok(serde_json::from_slice(kv.value())?)
    }

    /// Waits until the leader record satisfies `pred`; returns it.
    pub async fn wait_leader(
        &self,
        deadline: Duration,
        what: &str,
        pred: impl Fn(&LeaderRecord) -> bool,
    ) -> anyhow::Result<LeaderRecord> {
        let pred = &pred;
        eventually(deadline, what, || async move {
            match self.leader().await? {
                Some(l) if pred(&l) => Ok(l),
                other => bail!("leader is {other:?}"),
            }
        })
        .await
    }

    /// Waits until `node` runs as a standby whose WAL receiver streams.
    pub async fn wait_streaming(&self, node: &str, deadline: Duration) -> anyhow::Result<()> {
        let dsn = self.node(node)?.direct_dsn("postgres");
        eventually(deadline, &format!("{node} to stream"), || {
            let dsn = dsn.clone();
            async move {
                // One attempt may not take the whole deadline: a connection that hangs on a
                // loaded machine is dropped and tried again.
                let status = tokio::time::timeout(Duration::from_secs(10), async {
                    let c = connect(&dsn).await?;
                    let row = c
                        .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])
                        .await?;
                    anyhow::Ok(row.map(|r| r.get::<_, String>(0)))
                })
                .await
                .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??;
                anyhow::ensure!(status.as_deref() == Some("streaming"), "{status:?}");
                Ok(())
            }
        })
        .await
    }

    async fn create_app_database(&self) -> anyhow::Result<()> {
        let leader = self.leader().await?.context("no leader")?;
        let dsn = self.node(&leader.node)?.direct_dsn("postgres");
        let c = connect(&dsn).await?;
        let exists = c
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = 'app'", &[])
            .await?
            .is_some();
        if !exists {
            c.batch_execute("CREATE ROLE app LOGIN").await?;
        }
        let db = c
            .query_opt("SELECT 1 FROM pg_database WHERE datname = 'app'", &[])
            .await?
            .is_some();
        if !db {
            c.batch_execute("CREATE DATABASE app OWNER app").await?;
        }
        Ok(())
    }

    /// Runs `meridianctl --dir DIR ARGS…`; returns stdout, or an error with stderr.
    pub async fn meridianctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new(&self.bins.meridianctl)
            .arg("--dir")
            .arg(&self.spec.dir)
            .args(args)
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "meridianctl {args:?} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    /// The description written to `DIR/cluster.json`.
    pub fn cluster_file(&self) -> ClusterFile {
        ClusterFile {
            cluster: self.spec.cluster.clone(),
            etcd: self.etcd.endpoints(),
            coordinators: self
                .coordinators
                .iter()
                .map(|c| CoordinatorEntry {
                    name: c.name.clone(),
                    admin_addr: c.admin_addr.clone(),
                    pid: c.pid().unwrap_or(0),
                })
                .collect(),
            regions: self
                .proxies
                .iter()
                .map(|p| {
                    let redis = self.redis.iter().find(|r| r.region == p.region);
                    RegionEntry {
                        name: p.region.clone(),
                        proxy_dsn: p.dsn(),
                        proxy_pid: p.pid().unwrap_or(0),
                        redis_url: redis.map(RedisServer::url),
                        redis_pid: redis.and_then(RedisServer::pid),
                    }
                })
                .collect(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeEntry {
                    name: n.name.clone(),
                    region: n.region.clone(),
                    pg_port: n.pg_port,
                    postmaster_pid: n.postmaster_pid().unwrap_or(0),
                    agent_pid: n.agent_pid().unwrap_or(0),
                    initial_role: n.initial_role.to_owned(),
                })
                .collect(),
        }
    }

    pub fn write_cluster_file(&self) -> anyhow::Result<()> {
        let path = self.spec.dir.join("cluster.json");
        let json = serde_json::to_string_pretty(&self.cluster_file())?;
        std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The last lines of every log, for a failed test or start.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut paths: BTreeMap<String, PathBuf> = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.logs) {
            for e in entries.flatten() {
                paths.insert(e.file_name().to_string_lossy().into_owned(), e.path());
            }
        }
        for n in &self.nodes {
            for f in ["postgresql.log", "log/postgresql.log"] {
                let p = n.data_dir.join(f);
                if p.exists() {
                    paths.insert(format!("{} {f}", n.name), p);
                }
            }
        }
        for (name, path) in paths {
            out.push_str(&format!("\n----- {name} -----\n{}\n", tail(&path, lines)));
        }
        out
    }

    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!("local cluster logs:{}", self.log_tails(30)))
    }

    /// Stops everything: proxies, coordinators, agents (which stop their
    /// Postgres), leftover postmasters, etcd.
    pub async fn stop(&mut self) {
        let grace = Duration::from_secs(10);
        for p in &mut self.proxies {
            if let Some(mut proc) = p.proc.take() {
                proc.terminate(grace).await;
            }
        }
        for n in &mut self.nodes {
            if let Some(mut proc) = n.agent.take() {
                proc.terminate(grace).await;
            }
        }
        for c in &mut self.coordinators {
            if let Some(mut proc) = c.proc.take() {
                proc.terminate(grace).await;
            }
        }
        for n in &self.nodes {
            if let Some(pid) = n.postmaster_pid() {
                signal(pid, Signal::SIGQUIT);
            }
        }
        for r in &mut self.redis {
            r.stop().await;
        }
        self.etcd.stop().await;
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Proc's own Drop kills agents, coordinators, proxies, Redis servers and
        // etcd; the postmasters are not our direct children.
        for n in &self.nodes {
            if let Some(pid) = n.postmaster_pid() {
                signal(pid, Signal::SIGQUIT);
            }
        }
    }
}

/// Connects with tokio-postgres (no TLS) and drives the connection.
pub async fn connect(dsn: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {dsn}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The `--etcd` value that reaches etcd through `links`: their URLs, comma-separated.
fn link_urls(links: &[Link]) -> String {
    links
        .iter()
        .map(|l| format!("http://{}", l.local_addr()))
        .collect::<Vec<_>>()
        .join(",")
}
