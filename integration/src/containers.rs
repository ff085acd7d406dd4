//! Helpers for the container tests (`tests/containers.rs`), which run a
//! three-region cluster from the images `deploy/build-images.sh` builds locally.
//!
//! - [`docker_unreachable`]: why no Docker engine can be used (the tests then
//!   fail saying so), or `None`.
//! - [`missing_images`] / [`require_images`]: the `meridian/*` images must exist
//!   locally; a missing one is an error telling to run `deploy/build-images.sh`
//!   (the tests never pull).
//! - [`docker`] / [`docker_sync`]: the `docker` CLI with a deadline, for what
//!   testcontainers does not expose (`docker kill`, `docker network disconnect`).
//! - [`RunGuard`]: removes, on drop (also when a test panics), every container
//!   and the network labelled with one test run's id.
//! - [`StatusView`]: the parts of `meridianctl status --json` the tests decide
//!   on, with the pure checks [`StatusView::settled`] and [`pg_accepts_writes`].
//!
//! Limits: the Docker engine is driven through the `docker` CLI found on PATH
//! (the same engine testcontainers reaches through `DOCKER_HOST` or the socket).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// The images the container tests run (`meridian/NAME:TAG`).
pub const IMAGES: &[&str] = &["etcd", "coordinator", "node", "pgproxy"];

/// Label put on every container of a test run, valued with the run's id.
pub const RUN_LABEL: &str = "org.meridian.test-run";

/// How long one `docker` CLI call may take.
pub const DOCKER_CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The image tag: `MERIDIAN_TAG`, else `dev` (as `deploy/build-images.sh`).
pub fn image_tag() -> String {
    std::env::var("MERIDIAN_TAG")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "dev".to_owned())
}

/// Runs `docker ARGS` synchronously, killing it after `timeout`; its stdout
/// on success, else an error naming the command with its stderr.
pub fn docker_sync(args: &[&str], timeout: Duration) -> anyhow::Result<String> {
    let mut child = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `docker {}`", args.join(" ")))?;
    let end = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`docker {}` did not finish within {timeout:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    cli_result(args, out.status.success(), &out.stdout, &out.stderr)
}

/// Runs `docker ARGS` (async, at most [`DOCKER_CLI_TIMEOUT`]); stdout on success.
pub async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let run = tokio::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DOCKER_CLI_TIMEOUT, run)
        .await
        .map_err(|_| {
            anyhow!(
                "`docker {}` did not finish within {DOCKER_CLI_TIMEOUT:?}",
                args.join(" ")
            )
        })?
        .with_context(|| format!("cannot run `docker {}`", args.join(" ")))?;
    cli_result(args, out.status.success(), &out.stdout, &out.stderr)
}

fn cli_result(args: &[&str], ok: bool, stdout: &[u8], stderr: &[u8]) -> anyhow::Result<String> {
    if ok {
        Ok(String::from_utf8_lossy(stdout).into_owned())
    } else {
        bail!(
            "`docker {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(stderr).trim()
        )
    }
}

/// `None` when a Docker engine answers `docker info`; else the reason (no CLI,
/// no socket, daemon down), for the tests' failure message.
pub fn docker_unreachable() -> Option<String> {
    match docker_sync(
        &["info", "--format", "{{.ServerVersion}}"],
        Duration::from_secs(20),
    ) {
        Ok(version) if !version.trim().is_empty() => None,
        Ok(_) => Some("`docker info` printed no server version".to_owned()),
        Err(e) => Some(format!("{e:#}")),
    }
}

/// The `meridian/*:TAG` images of [`IMAGES`] the engine does not have.
pub fn missing_images(tag: &str) -> anyhow::Result<Vec<String>> {
    let mut missing = Vec::new();
    for name in IMAGES {
        let image = format!("meridian/{name}:{tag}");
        let listed = docker_sync(&["image", "ls", "--quiet", &image], Duration::from_secs(30))?;
        if listed.trim().is_empty() {
            missing.push(image);
        }
    }
    Ok(missing)
}

/// Fails, with the instruction to build them, when an image is missing.
pub fn require_images(tag: &str) -> anyhow::Result<()> {
    let missing = missing_images(tag)?;
    if !missing.is_empty() {
        bail!(
            "missing container image(s) {}: build them first with \
             `deploy/build-images.sh --profile debug{}` (the container tests never pull)",
            missing.join(", "),
            if tag == "dev" {
                String::new()
            } else {
                format!(" --tag {tag}")
            }
        );
    }
    Ok(())
}

/// A test run's id: `mtc-PID-N-MILLIS`, unique on this engine in practice; used
/// as container-name prefix, network name and [`RUN_LABEL`] value.
pub fn new_run_id(test: &str) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000)
        .unwrap_or(0);
    let test: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("mtc-{test}-{}-{millis}", std::process::id())
}

/// Removes, when dropped, every container labelled `RUN_LABEL=id` and the
/// network named `id`: the last line of clean-up, after testcontainers' own
/// (it also covers containers a failed start left behind).
pub struct RunGuard {
    pub id: String,
}

impl RunGuard {
    pub fn new(id: impl Into<String>) -> RunGuard {
        RunGuard { id: id.into() }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let filter = format!("label={RUN_LABEL}={}", self.id);
        let timeout = Duration::from_secs(60);
        if let Ok(ids) = docker_sync(&["ps", "-aq", "--filter", &filter], timeout) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids);
                if let Err(e) = docker_sync(&args, timeout) {
                    eprintln!("containers test clean-up: {e:#}");
                }
            }
        }
        let listed = docker_sync(
            &[
                "network",
                "ls",
                "-q",
                "--filter",
                &format!("name=^{}$", self.id),
            ],
            timeout,
        );
        if matches!(listed, Ok(ref s) if !s.trim().is_empty()) {
            if let Err(e) = docker_sync(&["network", "rm", &self.id], timeout) {
                eprintln!("containers test clean-up: {e:#}");
            }
        }
    }
}

/// One node as `meridianctl status --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub role: String,
    pub state: String,
    pub pg_up: bool,
    pub timeline: Option<u64>,
}

/// The cluster as `meridianctl status --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusView {
    pub state: String,
    pub leader: Option<String>,
    pub epoch: u64,
    pub nodes: Vec<NodeView>,
}

impl StatusView {
    /// Parses the output of `meridianctl status --json`.
    pub fn parse(json: &str) -> anyhow::Result<StatusView> {
        let doc: serde_json::Value = serde_json::from_str(json.trim())
            .with_context(|| format!("meridianctl status --json printed no JSON: {json:?}"))?;
        let text = |v: &serde_json::Value, key: &str| {
            v.get(key)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let nodes = doc
            .get("nodes")
            .and_then(serde_json::Value::as_array)
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| NodeView {
                        name: text(n, "name"),
                        role: text(n, "role"),
                        state: text(n, "state"),
                        pg_up: n
                            .get("pg_up")
                            .and_then(serde_json::Value::as_bool)
                            .unwrap_or(false),
                        timeline: n.get("timeline").and_then(serde_json::Value::as_u64),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(StatusView {
            state: text(&doc, "state"),
            leader: doc
                .get("leader")
                .and_then(serde_json::Value::as_str)
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
            epoch: doc
                .get("epoch")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            nodes,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// `Ok(leader)` when the cluster is serving with a leader that is not
    /// `not_leader`, at an epoch above `min_epoch`, the leader a primary with
    /// Postgres up, and every node of `replicas` a streaming replica on the
    /// leader's timeline; else why not.
    pub fn settled(
        &self,
        min_epoch: u64,
        not_leader: Option<&str>,
        replicas: &[&str],
    ) -> Result<String, String> {
        if self.state != "serving" {
            return Err(format!("cluster state is {:?}, not serving", self.state));
        }
        let leader = self.leader.clone().ok_or("no leader")?;
        if Some(leader.as_str()) == not_leader {
            return Err(format!("{leader} is still the leader"));
        }
        if self.epoch <= min_epoch {
            return Err(format!("epoch {} is not above {min_epoch}", self.epoch));
        }
        let lead = self
            .node(&leader)
            .ok_or_else(|| format!("leader {leader} is not among the nodes"))?;
        if lead.role != "primary" || !lead.pg_up {
            return Err(format!(
                "leader {leader} is {} with pg_up={}",
                lead.role, lead.pg_up
            ));
        }
        for r in replicas {
            let n = self
                .node(r)
                .ok_or_else(|| format!("node {r} is not in the status"))?;
            if n.role != "replica" || n.state != "streaming" || n.timeline != lead.timeline {
                return Err(format!(
                    "{r} is {} / {} on timeline {:?} (leader's: {:?})",
                    n.role, n.state, n.timeline, lead.timeline
                ));
            }
        }
        Ok(leader)
    }
}

/// Whether a node's Postgres accepts writes, from the outcome of
/// `psql -Atc 'select pg_is_in_recovery()'` run inside its container: only a
/// successful `f` does; an error (stopped, unreachable) or `t` means fenced.
pub fn pg_accepts_writes(psql: &anyhow::Result<String>) -> bool {
    matches!(psql, Ok(out) if out.trim() == "f")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const STATUS: &str = r#"{"cluster":"demo","epoch":3,"leader":"node-us-east","state":"serving",
      "nodes":[{"name":"node-eu-west","role":"replica","state":"streaming","pg_up":true,"timeline":2},
               {"name":"node-us-east","role":"primary","state":"running","pg_up":true,"timeline":2},
               {"name":"node-us-west","role":"replica","state":"catching_up","pg_up":true,"timeline":2}]}"#;

    #[test]
    fn parses_the_status_document() {
        let s = StatusView::parse(STATUS).unwrap();
        assert_eq!(s.leader.as_deref(), Some("node-us-east"));
        assert_eq!(s.epoch, 3);
        assert_eq!(s.nodes.len(), 3);
        assert_eq!(s.node("node-eu-west").unwrap().timeline, Some(2));
        assert!(StatusView::parse("not json").is_err());
    }

    #[test]
    fn settled_checks_leader_epoch_and_replicas() {
        let s = StatusView::parse(STATUS).unwrap();
        assert_eq!(
            s.settled(2, None, &["node-eu-west"]).unwrap(),
            "node-us-east"
        );
        assert!(s.settled(3, None, &[]).unwrap_err().contains("epoch"));
        assert!(s
            .settled(0, Some("node-us-east"), &[])
            .unwrap_err()
            .contains("still the leader"));
        assert!(s
            .settled(0, None, &["node-us-west"])
            .unwrap_err()
            .contains("catching_up"));
        let mut down = s.clone();
        down.state = "failing_over".into();
        assert!(down.settled(0, None, &[]).is_err());
        let mut no_leader = s;
        no_leader.leader = None;
        assert_eq!(no_leader.settled(0, None, &[]).unwrap_err(), "no leader");
    }

    #[test]
    fn only_a_successful_f_accepts_writes() {
        assert!(pg_accepts_writes(&Ok("f\n".into())));
        assert!(!pg_accepts_writes(&Ok("t\n".into())));
        assert!(!pg_accepts_writes(&Err(anyhow!("connection refused"))));
    }

    #[test]
    fn run_ids_are_docker_names() {
        let id = new_run_id("kill_primary!");
        assert!(id.starts_with("mtc-killprimary-"));
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
}
