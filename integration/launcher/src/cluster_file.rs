//! `DIR/cluster.json`: what a running local cluster consists of. Field names are a
//! contract with scripts and monitoring (issue 3); add fields, never rename.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub cluster: String,
    /// etcd client URLs, e.g. `http://127.0.0.1:23790`.
    pub etcd: Vec<String>,
    pub coordinators: Vec<CoordinatorEntry>,
    pub regions: Vec<RegionEntry>,
    pub nodes: Vec<NodeEntry>,
}

/// One coordinator process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorEntry {
    pub name: String,
    /// gRPC admin address, `host:port`.
    pub admin_addr: String,
    pub pid: u32,
}

/// One region with its proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionEntry {
    pub name: String,
    pub proxy_dsn: String,
    pub proxy_pid: u32,
    /// The region's Redis, `redis://127.0.0.1:PORT` (absent: started without Redis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// PID of its `redis-server` (absent: none running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_pid: Option<u32>,
}

/// One Postgres node with its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    pub region: String,
    pub pg_port: u16,
    pub postmaster_pid: u32,
    pub agent_pid: u32,
    pub initial_role: String,
}

impl ClusterFile {
    /// Reads `DIR/cluster.json`, naming the file in errors.
    pub fn load(dir: &Path) -> anyhow::Result<ClusterFile> {
        let path = dir.join("cluster.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a cluster file: {e}", path.display()))
    }
}
