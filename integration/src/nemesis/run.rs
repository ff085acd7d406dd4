//! Carries a schedule out against a [`LocalCluster`] while a workload runs through every
//! region's proxy, then heals, waits for the cluster to converge and reads the final state.
//!
//! The workload, per region: a log writer (inserts of unique ids, each acknowledgement
//! recording the `meridian.epoch` of the node that committed it), a bank client (transfers
//! between random accounts in one transaction), a bank reader (the total, in one
//! statement), a session client (increments of the region's register, each followed by a
//! read of it in the same session, which the proxy serves from the region's replica) and a
//! causal reader (another region's register, under the token its session client published
//! after its last increment). Every client reconnects after an error; each operation is bounded by
//! [`OP_TIMEOUT`] (running out is an indeterminate outcome).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_launcher::process::signal;
use meridian_launcher::{connect, LocalCluster};
use nix::sys::signal::Signal;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::check::{self, Final, Verdicts, Window};
use super::history::{self, indeterminate, Kind, Op, Outcome};
use super::schedule::{self, Fault, Step};

/// Longest one operation may take before it counts as indeterminate.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Accounts of the bank and what each starts with.
pub const ACCOUNTS: i32 = 5;
pub const START_BALANCE: i64 = 200;
/// How long the cluster may take to converge after a fault is healed.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(90);

/// The bank as the workload sets it up.
pub const BANK: check::Bank = check::Bank {
    accounts: ACCOUNTS,
    start_balance: START_BALANCE,
};

/// Creates the workload's tables through `dsn` (the primary's region proxy): the log,
/// the bank, and one register per region.
pub async fn setup(dsn: &str, regions: &[String]) -> anyhow::Result<()> {
    let c = connect(dsn).await?;
    let registers: Vec<String> = regions.iter().map(|r| format!("('{r}', 0)")).collect();
    c.batch_execute(&format!(
        "CREATE TABLE nemesis_log (id bigint PRIMARY KEY);
         CREATE TABLE nemesis_bank (id int PRIMARY KEY, balance bigint NOT NULL);
         INSERT INTO nemesis_bank SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g;
         CREATE TABLE nemesis_transfers (id bigint PRIMARY KEY, from_id int NOT NULL,
           to_id int NOT NULL, amount bigint NOT NULL);
         CREATE TABLE nemesis_reg (key text PRIMARY KEY, v bigint NOT NULL);
         INSERT INTO nemesis_reg VALUES {};",
        registers.join(", ")
    ))
    .await?;
    Ok(())
}

/// The running workload.
pub struct Workload {
    t0: Instant,
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<Op>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Clone, Copy)]
enum Role {
    Log,
    Bank,
    Reader,
    Session,
    Causal,
}

impl Workload {
    /// Starts five clients per region; ids of region `i` start at `(i + 1) * 10^9 + id_base`.
    pub fn start(cluster: &LocalCluster, id_base: i64, t0: Instant) -> anyhow::Result<Workload> {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(Mutex::new(Vec::new()));
        let board = Board::default();
        let mut tasks = Vec::new();
        for (i, region) in cluster.spec.regions.iter().enumerate() {
            let dsn = cluster.proxy(region)?.dsn();
            for (role, name) in [
                (Role::Log, "log"),
                (Role::Bank, "bank"),
                (Role::Reader, "reader"),
                (Role::Session, "session"),
                (Role::Causal, "causal"),
            ] {
                let spec = ClientSpec {
                    name: format!("{region}/{name}"),
                    dsn: dsn.clone(),
                    role,
                    region: i,
                    regions: cluster.spec.regions.clone(),
                    first_id: (i as i64 + 1) * 1_000_000_000 + id_base,
                };
                tasks.push(tokio::spawn(client(
                    spec,
                    t0,
                    stop.clone(),
                    ops.clone(),
                    board.clone(),
                )));
            }
        }
        Ok(Workload {
            t0,
            stop,
            ops,
            tasks,
        })
    }

    /// Milliseconds since the run started (the history's clock).
    pub fn now_ms(&self) -> u64 {
        ms_since(self.t0)
    }

    /// Acknowledged inserts so far.
    pub fn acked_inserts(&self) -> usize {
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|o| {
                matches!(
                    (&o.kind, &o.outcome),
                    (Kind::Insert { .. }, Outcome::Ok { .. })
                )
            })
            .count()
    }

    /// Stops every client (operations in flight finish or time out) and returns the history.
    pub async fn stop(self) -> Vec<Op> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let mut ops = std::mem::take(&mut *self.ops.lock().unwrap_or_else(|e| e.into_inner()));
        ops.sort_by_key(|o| (o.start_ms, o.end_ms));
        ops
    }
}

fn ms_since(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The causal tokens the session clients publish: register key -> the latest token.
type Board = Arc<Mutex<BTreeMap<String, Token>>>;

/// An increment's causal token: the value it gave the register, its
/// `meridian.last_commit_lsn` and when it started.
#[derive(Clone)]
struct Token {
    value: i64,
    lsn: String,
    written_ms: u64,
}

/// What one client needs to know.
struct ClientSpec {
    name: String,
    dsn: String,
    role: Role,
    /// Its region: the log writer's and the bank's first id (each its own table), the
    /// session client's register.
    region: usize,
    /// Every region's name (the register keys).
    regions: Vec<String>,
    first_id: i64,
}

async fn client(
    spec: ClientSpec,
    t0: Instant,
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<Op>>>,
    board: Board,
) {
    let mut conn: Option<Client> = None;
    let mut next_id = spec.first_id;
    // Sessions of this client (a reconnect starts the next), and whether its next
    // register operation is a read.
    let mut session = 0u32;
    let mut read_next = false;
    let own_key = spec.regions[spec.region].clone();
    let other_key = spec.regions[(spec.region + 1) % spec.regions.len()].clone();
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match tokio::time::timeout(Duration::from_secs(5), connect(&spec.dsn)).await {
                Ok(Ok(c)) => {
                    conn = Some(c);
                    session += 1;
                    read_next = false;
                }
                _ => {
                    // Pacing of reconnect attempts, not a wait on a condition.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let (kind, sql) = match spec.role {
            Role::Log => {
                next_id += 1;
                (
                    Kind::Insert { id: next_id },
                    format!(
                        "INSERT INTO nemesis_log (id) VALUES ({next_id}) \
                         RETURNING current_setting('meridian.epoch', true)"
                    ),
                )
            }
            Role::Bank => {
                next_id += 1;
                let from = rand::random_range(1..=ACCOUNTS);
                let to = (from % ACCOUNTS) + 1;
                let amount = rand::random_range(1..=10i64);
                (
                    Kind::Transfer {
                        id: next_id,
                        from,
                        to,
                        amount,
                    },
                    format!(
                        "BEGIN; INSERT INTO nemesis_transfers VALUES ({next_id}, {from}, {to}, {amount}) \
                         RETURNING current_setting('meridian.epoch', true); \
                         UPDATE nemesis_bank SET balance = balance - {amount} WHERE id = {from}; \
                         UPDATE nemesis_bank SET balance = balance + {amount} WHERE id = {to}; COMMIT"
                    ),
                )
            }
            Role::Reader => (
                Kind::ReadTotal,
                "SELECT sum(balance)::bigint FROM nemesis_bank".to_owned(),
            ),
            Role::Session if read_next => (
                Kind::RegRead {
                    key: own_key.clone(),
                    session,
                },
                format!("SELECT v FROM nemesis_reg WHERE key = '{own_key}'"),
            ),
            Role::Session => (
                Kind::RegWrite {
                    key: own_key.clone(),
                    session,
                },
                format!(
                    "UPDATE nemesis_reg SET v = v + 1 WHERE key = '{own_key}' \
                     RETURNING v, current_setting('meridian.epoch', true)"
                ),
            ),
            Role::Causal => {
                let token = board
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&other_key)
                    .cloned();
                let Some(token) = token else {
                    // Pacing until the other region's first increment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                // Answered by the proxy itself.
                if exec(
                    &mut conn,
                    &format!("SET meridian.min_lsn = '{}'", token.lsn),
                )
                .await
                .is_err()
                {
                    // Pacing of retries, not a wait on a condition.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                (
                    Kind::CausalRead {
                        key: other_key.clone(),
                        after: token.value,
                        written_ms: token.written_ms,
                    },
                    format!("SELECT v FROM nemesis_reg WHERE key = '{other_key}'"),
                )
            }
        };
        let start_ms = ms_since(t0);
        let result = exec(&mut conn, &sql).await;
        let end_ms = ms_since(t0);
        let outcome = match result {
            Ok(row) => match kind {
                Kind::Insert { .. } => Outcome::Ok {
                    epoch: column(&row, 0),
                    value: None,
                },
                Kind::RegWrite { .. } => Outcome::Ok {
                    epoch: column(&row, 1),
                    value: column(&row, 0),
                },
                Kind::ReadTotal | Kind::RegRead { .. } | Kind::CausalRead { .. } => Outcome::Ok {
                    epoch: None,
                    value: column(&row, 0),
                },
                Kind::Transfer { .. } => Outcome::Ok {
                    epoch: column(&row, 0),
                    value: None,
                },
            },
            Err(outcome) => outcome,
        };
        if let (Kind::RegWrite { .. }, Outcome::Ok { value: Some(v), .. }) = (&kind, &outcome) {
            // The increment's token, read in the same session.
            if let Ok(row) = exec(&mut conn, "SHOW meridian.last_commit_lsn").await {
                if let Some(lsn) = row.first().cloned().flatten() {
                    board.lock().unwrap_or_else(|e| e.into_inner()).insert(
                        own_key.clone(),
                        Token {
                            value: *v,
                            lsn,
                            written_ms: start_ms,
                        },
                    );
                }
            }
        }
        if matches!(kind, Kind::RegWrite { .. } | Kind::RegRead { .. }) {
            read_next = !read_next;
        }
        ops.lock().unwrap_or_else(|e| e.into_inner()).push(Op {
            client: spec.name.clone(),
            start_ms,
            end_ms,
            kind,
            outcome,
        });
        // Pacing of the workload, not a wait on a condition.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `sql` on the session (simple protocol, bounded by [`OP_TIMEOUT`]): the first
/// row's columns as text, or the outcome of the failure; a failure that leaves the
/// session unusable or the outcome open closes it (`conn` becomes `None`).
async fn exec(conn: &mut Option<Client>, sql: &str) -> Result<Vec<Option<String>>, Outcome> {
    let Some(c) = conn.as_ref() else {
        return Err(Outcome::Unknown {
            error: "not connected".to_owned(),
        });
    };
    match tokio::time::timeout(OP_TIMEOUT, c.simple_query(sql)).await {
        Ok(Ok(messages)) => Ok(first_row(&messages)),
        Ok(Err(e)) => {
            let code = e.as_db_error().map(|d| d.code().code().to_owned());
            if c.is_closed() || code.is_none() || indeterminate(code.as_deref()) {
                *conn = None;
            }
            if indeterminate(code.as_deref()) {
                Err(Outcome::Unknown {
                    error: e.to_string(),
                })
            } else {
                Err(Outcome::Fail {
                    code: code.unwrap_or_default(),
                })
            }
        }
        Err(_) => {
            *conn = None;
            Err(Outcome::Unknown {
                error: format!("no answer within {OP_TIMEOUT:?}"),
            })
        }
    }
}

/// Column `i` of `row`, parsed.
fn column<T: std::str::FromStr>(row: &[Option<String>], i: usize) -> Option<T> {
    row.get(i)?.as_deref()?.parse().ok()
}

fn first_row(messages: &[SimpleQueryMessage]) -> Vec<Option<String>> {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// What happened to one step: when its fault started and when the cluster had converged
/// after it (the history's clock), and what it hit.
#[derive(Debug, Clone)]
pub struct Applied {
    pub step: Step,
    pub target: String,
    pub window: Window,
}

/// Waits `step.quiet`, applies the fault to whoever holds the role, holds it, heals, and
/// waits until the cluster converged again.
pub async fn apply(
    cluster: &mut LocalCluster,
    step: &Step,
    workload: &Workload,
) -> anyhow::Result<Applied> {
    // Pacing: workload without faults between two steps.
    tokio::time::sleep(step.quiet).await;
    let leader = cluster
        .leader()
        .await?
        .context("no leader before the fault")?;
    let start_ms = workload.now_ms();
    let target = match step.fault {
        Fault::KillPrimaryPostmaster => {
            cluster.kill_postmaster(&leader.node)?;
            leader.node.clone()
        }
        Fault::KillPrimaryAgent => {
            cluster.kill_agent(&leader.node).await?;
            tokio::time::sleep(step.hold).await;
            cluster.start_agent(&leader.node)?;
            leader.node.clone()
        }
        Fault::KillPrimaryNode => {
            cluster.kill_agent(&leader.node).await?;
            cluster.kill_postmaster(&leader.node)?;
            tokio::time::sleep(step.hold).await;
            cluster.start_agent(&leader.node)?;
            leader.node.clone()
        }
        Fault::PausePrimaryPostgres => {
            let postmaster = cluster
                .node(&leader.node)?
                .postmaster_pid()
                .context("the primary has no running postmaster")?;
            // The postmaster first, so that it forks no backend that stays awake.
            signal(postmaster, Signal::SIGSTOP);
            let backends = children(postmaster);
            for pid in &backends {
                signal(*pid, Signal::SIGSTOP);
            }
            tokio::time::sleep(step.hold).await;
            for pid in &backends {
                signal(*pid, Signal::SIGCONT);
            }
            signal(postmaster, Signal::SIGCONT);
            leader.node.clone()
        }
        Fault::PauseReplicaReplay => {
            let replicas: Vec<String> = cluster
                .nodes
                .iter()
                .filter(|n| n.name != leader.node)
                .map(|n| n.name.clone())
                .collect();
            anyhow::ensure!(!replicas.is_empty(), "no replica to pause");
            let node = replicas[step.region % replicas.len()].clone();
            let dsn = cluster.node(&node)?.direct_dsn("postgres");
            connect(&dsn)
                .await?
                .batch_execute("SELECT pg_wal_replay_pause()")
                .await
                .with_context(|| format!("pausing replay on {node}"))?;
            tokio::time::sleep(step.hold).await;
            connect(&dsn)
                .await?
                .batch_execute("SELECT pg_wal_replay_resume()")
                .await
                .with_context(|| format!("resuming replay on {node}"))?;
            node
        }
        Fault::PausePrimaryAgent => {
            let pid = cluster
                .node(&leader.node)?
                .agent_pid()
                .context("the primary's agent is not running")?;
            signal(pid, Signal::SIGSTOP);
            tokio::time::sleep(step.hold).await;
            signal(pid, Signal::SIGCONT);
            leader.node.clone()
        }
        Fault::PartitionPrimary => {
            cluster.node(&leader.node)?.partition();
            tokio::time::sleep(step.hold).await;
            cluster.node(&leader.node)?.heal();
            leader.node.clone()
        }
        Fault::KillActiveCoordinator => {
            let active = cluster.active_coordinator().await?.name;
            cluster.kill_coordinator(&active).await?;
            tokio::time::sleep(step.hold).await;
            cluster.restart_coordinator(&active)?;
            active
        }
        Fault::PauseCoordinators => {
            cluster.pause_coordinators();
            tokio::time::sleep(step.hold).await;
            cluster.resume_coordinators();
            "every coordinator".to_owned()
        }
        Fault::CutCoordinatorLinks => {
            let relays = || cluster.nodes.iter().flat_map(|n| n.quic_links.values());
            relays().for_each(|r| r.control().cut());
            tokio::time::sleep(step.hold).await;
            relays().for_each(|r| r.control().heal());
            let after = cluster.leader().await?.context("no leader after the cut")?;
            anyhow::ensure!(
                after.epoch == leader.epoch,
                "the coordinators replaced the primary {} (epoch {} -> {}) although only their QUIC links were cut",
                leader.node,
                leader.epoch,
                after.epoch
            );
            "every agent's QUIC".to_owned()
        }
        Fault::StopRedis => {
            let region = cluster.spec.regions[step.region % cluster.spec.regions.len()].clone();
            cluster.stop_redis(&region).await?;
            tokio::time::sleep(step.hold).await;
            cluster.start_redis(&region).await?;
            format!("redis-{region}")
        }
        Fault::KillEtcdMember => {
            anyhow::ensure!(
                cluster.etcd.members() >= 3,
                "{} needs three etcd members (ClusterSpec.etcd_members)",
                step.fault.name()
            );
            let member = step.region % cluster.etcd.members();
            let pid = cluster.node(&leader.node)?.postmaster_pid();
            cluster.etcd.kill_member(member).await?;
            tokio::time::sleep(step.hold).await;
            cluster.etcd.restart_member(member)?;
            cluster
                .etcd
                .wait_member(member, CONVERGE_WITHIN)
                .await
                .context("the restarted etcd member did not rejoin")?;
            let after = cluster
                .leader()
                .await?
                .context("no leader after an etcd member came back")?;
            anyhow::ensure!(
                after.epoch == leader.epoch && cluster.node(&leader.node)?.postmaster_pid() == pid,
                "losing one etcd member of three replaced or stopped the primary {} (epoch {} -> {})",
                leader.node,
                leader.epoch,
                after.epoch
            );
            format!("etcd-{}", member + 1)
        }
        Fault::KillEtcdMajority => {
            let members = cluster.etcd.members();
            anyhow::ensure!(
                members >= 3,
                "{} needs three etcd members (ClusterSpec.etcd_members)",
                step.fault.name()
            );
            // Every member but one (`step.region` picks the survivor).
            let survivor = step.region % members;
            let killed: Vec<usize> = (0..members).filter(|m| *m != survivor).collect();
            let pid = cluster.node(&leader.node)?.postmaster_pid();
            for m in &killed {
                cluster.etcd.kill_member(*m).await?;
            }
            tokio::time::sleep(cluster.spec.lease_ttl + step.hold).await;
            let after = cluster.node(&leader.node)?.postmaster_pid();
            let promoted = promoted_without_etcd(cluster, &leader.node).await;
            for m in &killed {
                cluster.etcd.restart_member(*m)?;
            }
            anyhow::ensure!(
                pid.is_some() && after == pid,
                "the primary {} did not keep serving while etcd had no quorum (postmaster {pid:?}, then {after:?})",
                leader.node
            );
            promoted?;
            let names: Vec<String> = killed.iter().map(|m| format!("etcd-{}", m + 1)).collect();
            names.join("+")
        }
        Fault::EtcdLost => {
            let pid = cluster.node(&leader.node)?.postmaster_pid();
            cluster.etcd.pause();
            tokio::time::sleep(cluster.spec.lease_ttl + step.hold).await;
            let after = cluster.node(&leader.node)?.postmaster_pid();
            cluster.etcd.resume();
            anyhow::ensure!(
                pid.is_some() && after == pid,
                "the primary {} did not keep serving through the etcd outage (postmaster {pid:?}, then {after:?})",
                leader.node
            );
            "etcd".to_owned()
        }
        Fault::EtcdLostPartitionPrimary => {
            cluster.etcd.pause();
            // Past the lease TTL: the primary serves under the failsafe.
            tokio::time::sleep(cluster.spec.lease_ttl + Duration::from_secs(1)).await;
            cluster.node(&leader.node)?.partition();
            tokio::time::sleep(step.hold).await;
            let fenced = meridian_launcher::wait::eventually(
                FENCED_WITHIN,
                "the partitioned primary to fence itself",
                || async {
                    anyhow::ensure!(cluster.node(&leader.node)?.postmaster_pid().is_none());
                    Ok(())
                },
            )
            .await;
            let promoted = promoted_without_etcd(cluster, &leader.node).await;
            cluster.etcd.resume();
            let failover = cluster
                .wait_leader(CONVERGE_WITHIN, "a failover once etcd is back", |l| {
                    l.is_serving() && l.epoch > leader.epoch
                })
                .await;
            cluster.node(&leader.node)?.heal();
            fenced?;
            promoted?;
            failover?;
            leader.node.clone()
        }
        Fault::EtcdLostKillPrimary => {
            cluster.etcd.pause();
            tokio::time::sleep(cluster.spec.lease_ttl + Duration::from_secs(1)).await;
            cluster
                .kill_postmaster(&leader.node)
                .context("past the lease TTL without etcd the primary had stopped: the failsafe did not hold")?;
            tokio::time::sleep(step.hold).await;
            let promoted = promoted_without_etcd(cluster, &leader.node).await;
            cluster.etcd.resume();
            promoted?;
            leader.node.clone()
        }
    };
    converge(cluster, workload)
        .await
        .with_context(|| format!("converging after {} of {target}", step.fault.name()))?;
    Ok(Applied {
        step: step.clone(),
        target,
        window: Window {
            start_ms,
            end_ms: workload.now_ms(),
        },
    })
}

/// The child processes of `pid` (a postmaster's backends and auxiliary processes).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// How long a primary that no replica can confirm may take to stop: the
/// failsafe window, the agent's fence deadline and the stop.
const FENCED_WITHIN: Duration = Duration::from_secs(8);

/// Fails when a node other than `old` runs outside recovery (asked directly):
/// without etcd nobody may be promoted.
async fn promoted_without_etcd(cluster: &LocalCluster, old: &str) -> anyhow::Result<()> {
    for node in &cluster.nodes {
        if node.name == old {
            continue;
        }
        let in_recovery = tokio::time::timeout(Duration::from_secs(5), async {
            let c = connect(&node.direct_dsn("postgres")).await?;
            let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await?;
            anyhow::Ok(row.get::<_, bool>(0))
        })
        .await;
        if let Ok(Ok(false)) = in_recovery {
            anyhow::bail!("{} was promoted while etcd was out of reach", node.name);
        }
    }
    Ok(())
}

/// Waits until a serving leader has every other node streaming (the leader is read again
/// on every attempt: right after a fault the record may still name the failed primary) and
/// the workload has acknowledged writes again.
pub async fn converge(cluster: &LocalCluster, workload: &Workload) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let left = || deadline.saturating_duration_since(Instant::now());
    meridian_launcher::wait::eventually(
        left(),
        "a serving leader with every other node streaming",
        || async {
            let leader = cluster.leader().await?.context("no leader")?;
            anyhow::ensure!(
                leader.is_serving(),
                "the leader {} is not serving",
                leader.node
            );
            for node in &cluster.nodes {
                if node.name != leader.node {
                    let status = receiver_status(&node.direct_dsn("postgres")).await?;
                    anyhow::ensure!(
                        status.as_deref() == Some("streaming"),
                        "{} (leader {}): WAL receiver {status:?}",
                        node.name,
                        leader.node
                    );
                }
            }
            Ok(())
        },
    )
    .await?;
    let acked = workload.acked_inserts();
    meridian_launcher::wait::eventually(left(), "writes acknowledged again", || async {
        anyhow::ensure!(workload.acked_inserts() > acked + 3);
        Ok(())
    })
    .await
}

/// `pg_stat_wal_receiver.status` of the node at `dsn`, in one bounded attempt.
async fn receiver_status(dsn: &str) -> anyhow::Result<Option<String>> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let c = connect(dsn).await?;
        let row = c
            .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])
            .await?;
        anyhow::Ok(row.map(|r| r.get::<_, String>(0)))
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer within 5 s"))?
}

/// The final log, bank and transfer ledger, read on the converged primary directly.
pub async fn final_state(cluster: &LocalCluster) -> anyhow::Result<Final> {
    let leader = cluster.leader().await?.context("no leader at the end")?;
    let c = connect(&cluster.node(&leader.node)?.direct_dsn("app")).await?;
    let log_ids = c
        .query("SELECT id FROM nemesis_log", &[])
        .await?
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect();
    let balances = c
        .query("SELECT id, balance FROM nemesis_bank", &[])
        .await?
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
        .collect();
    let transfers = c
        .query(
            "SELECT id, from_id, to_id, amount FROM nemesis_transfers",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                check::Transfer {
                    from: r.get(1),
                    to: r.get(2),
                    amount: r.get(3),
                },
            )
        })
        .collect();
    Ok(Final {
        log_ids,
        balances,
        transfers,
    })
}

/// What a run gave: the faults as applied, the history and the verdicts.
pub struct Report {
    pub applied: Vec<Applied>,
    pub history: Vec<Op>,
    pub verdicts: Verdicts,
}

/// A whole run on a started cluster: the workload's tables, then `schedules` schedules of
/// `steps` faults from seeds `seed`, `seed + 1`, ... (kinds from `kinds`, all when empty),
/// each fault healed and converged before the next; the history is written to
/// `history_path` (also when a step fails: the error names the step).
pub async fn run_seeds(
    cluster: &mut LocalCluster,
    seed: u64,
    schedules: u64,
    steps: usize,
    kinds: &[Fault],
    history_path: &std::path::Path,
) -> anyhow::Result<Report> {
    let regions = cluster.spec.regions.len();
    let plans = (0..schedules)
        .map(|i| {
            (
                seed + i,
                schedule::schedule(seed + i, steps, kinds, regions),
            )
        })
        .collect();
    run_plans(cluster, plans, history_path).await
}

/// [`run_seeds`] with the schedules given: (seed, for reports; steps).
pub async fn run_plans(
    cluster: &mut LocalCluster,
    plans: Vec<(u64, Vec<Step>)>,
    history_path: &std::path::Path,
) -> anyhow::Result<Report> {
    let first_region = cluster.spec.regions.first().context("no region")?.clone();
    setup(&cluster.proxy(&first_region)?.dsn(), &cluster.spec.regions).await?;
    let workload = Workload::start(cluster, 0, Instant::now())?;
    converge(cluster, &workload).await?;
    let mut applied = Vec::new();
    let mut failure = None;
    'schedules: for (seed, plan) in &plans {
        tracing::info!(seed, ?plan, "nemesis schedule");
        for step in plan {
            match apply(cluster, step, &workload).await {
                Ok(a) => {
                    tracing::info!(
                        fault = a.step.fault.name(),
                        target = %a.target,
                        hold = ?a.step.hold,
                        window_ms = a.window.end_ms - a.window.start_ms,
                        "nemesis fault healed and converged"
                    );
                    applied.push(a);
                }
                Err(e) => {
                    failure = Some(e.context(format!("seed {seed}")));
                    break 'schedules;
                }
            }
        }
    }
    let ops = workload.stop().await;
    std::fs::write(history_path, history::to_json_lines(&ops))
        .with_context(|| format!("writing {}", history_path.display()))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let fin = final_state(cluster).await?;
    let windows: Vec<Window> = applied.iter().map(|a| a.window).collect();
    let verdicts = check::check(&ops, &fin, &BANK, &windows);
    Ok(Report {
        applied,
        history: ops,
        verdicts,
    })
}
