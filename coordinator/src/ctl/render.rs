//! What `meridianctl` prints: the `status` table (modelled on `patronictl list`),
//! the `status --json` document, and event lines. Pure functions over the
//! status snapshot.

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::control::{ClusterEvent, ClusterStatus, NodeStatus};

/// Who answered, when it was not the active coordinator.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ActiveRef {
    pub name: String,
    pub admin_addr: String,
}

/// The document `status --json` prints. Its keys are a contract with scripts:
/// `epoch`, `leader`, `state`, `nodes[]` with `name`, `region`, `role`, `state`,
/// `timeline`, `lag_bytes`; the others may be added to, never renamed.
#[derive(Debug, Serialize)]
pub struct StatusJson<'a> {
    pub cluster: &'a str,
    pub coordinator: &'a str,
    pub active: bool,
    pub epoch: u64,
    pub leader: Option<&'a str>,
    pub state: &'a str,
    pub paused: bool,
    pub sync_mode: &'a str,
    pub sync_standbys: &'a [String],
    pub nodes: Vec<&'a NodeStatus>,
    pub proxies: &'a [crate::control::ProxyStatus],
    /// Present when a standby answered: the active coordinator per etcd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_coordinator: Option<&'a ActiveRef>,
}

/// Nodes in display order (by name, as patronictl).
fn sorted_nodes(status: &ClusterStatus) -> Vec<&NodeStatus> {
    let mut nodes: Vec<&NodeStatus> = status.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes
}

/// The `status --json` document.
pub fn status_json(status: &ClusterStatus, active: Option<&ActiveRef>) -> serde_json::Value {
    let doc = StatusJson {
        cluster: &status.cluster,
        coordinator: &status.coordinator,
        active: status.active,
        epoch: status.epoch,
        leader: status.leader.as_deref(),
        state: &status.state,
        paused: status.paused,
        sync_mode: &status.sync_mode,
        sync_standbys: &status.sync_standbys,
        nodes: sorted_nodes(status),
        proxies: &status.proxies,
        active_coordinator: active,
    };
    // Serialising plain strings and numbers cannot fail.
    serde_json::to_value(doc).unwrap_or(serde_json::Value::Null)
}

/// A lag in milliseconds for humans: `0 ms`, `850 ms`, `1.3 s`, `2 min 5 s`.
pub fn format_lag_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// Draws rows (the first is the header) as an ASCII table; columns listed in
/// `right` are right-aligned.
pub fn draw_table(rows: &[Vec<String>], right: &[usize]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let rule: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let mut out = rule.clone();
    for (i, row) in rows.iter().enumerate() {
        for (c, width) in widths.iter().enumerate() {
            let cell = row.get(c).map(String::as_str).unwrap_or("");
            if right.contains(&c) {
                out.push_str(&format!("| {cell:>width$} "));
            } else {
                out.push_str(&format!("| {cell:<width$} "));
            }
        }
        out.push_str("|\n");
        if i == 0 {
            out.push_str(&rule);
        }
    }
    out.push_str(&rule);
    out
}

/// The `status` table and the summary lines under it.
pub fn status_table(status: &ClusterStatus, active: Option<&ActiveRef>) -> String {
    let mut rows = vec![[
        "Node",
        "Region",
        "Role",
        "State",
        "TL",
        "Lag (bytes)",
        "Lag (time)",
        "Epoch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for n in sorted_nodes(status) {
        let leader_mark = if status.leader.as_deref() == Some(n.name.as_str()) {
            "*"
        } else {
            ""
        };
        rows.push(vec![
            format!("{}{leader_mark}", n.name),
            n.region.clone(),
            n.role.clone(),
            n.state.clone(),
            n.timeline.to_string(),
            opt(n.lag_bytes),
            n.lag_ms.map(format_lag_ms).unwrap_or_default(),
            n.epoch_seen.to_string(),
        ]);
    }
    let mut out = format!(
        "Cluster: {} (coordinator {}, {})\n",
        or_dash(&status.cluster),
        or_dash(&status.coordinator),
        if status.active { "active" } else { "standby" }
    );
    out.push_str(&draw_table(&rows, &[4, 5, 6, 7]));
    let sync = if status.sync_standbys.is_empty() {
        or_dash(&status.sync_mode).to_string()
    } else {
        format!(
            "{} (standbys: {})",
            or_dash(&status.sync_mode),
            status.sync_standbys.join(", ")
        )
    };
    out.push_str(&format!(
        "Leader: {} | State: {} | Epoch: {} | Sync: {} | Paused: {}\n",
        status.leader.as_deref().unwrap_or("none"),
        or_dash(&status.state),
        status.epoch,
        sync,
        if status.paused { "yes" } else { "no" }
    ));
    let proxies: Vec<String> = status
        .proxies
        .iter()
        .map(|p| format!("{} ({}, {})", p.id, p.region, p.listen_addr))
        .collect();
    out.push_str(&format!(
        "Proxies: {}\n",
        if proxies.is_empty() {
            "none".to_string()
        } else {
            proxies.join(", ")
        }
    ));
    if let Some(active) = active {
        out.push_str(&format!(
            "Note: answered by a standby; the active coordinator is {} at {}\n",
            or_dash(&active.name),
            or_dash(&active.admin_addr)
        ));
    }
    out
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// One event as one line: `TIME KIND [node=N] epoch=E MESSAGE`.
pub fn event_line(e: &ClusterEvent) -> String {
    let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(e.at_ms));
    let node = e
        .node
        .as_deref()
        .map(|n| format!(" node={n}"))
        .unwrap_or_default();
    format!("{at} {}{node} epoch={} {}", e.kind, e.epoch, e.message)
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ProxyStatus;
    use std::collections::BTreeSet;

    fn status() -> ClusterStatus {
        ClusterStatus {
            cluster: "demo".into(),
            coordinator: "c1".into(),
            active: true,
            epoch: 3,
            leader: Some("us-west-1".into()),
            state: "serving".into(),
            paused: false,
            sync_mode: "on".into(),
            sync_standbys: vec!["us-east-1".into()],
            nodes: vec![
                NodeStatus {
                    name: "us-west-1".into(),
                    region: "us-west".into(),
                    role: "primary".into(),
                    state: "running".into(),
                    timeline: 2,
                    epoch_seen: 3,
                    ..NodeStatus::default()
                },
                NodeStatus {
                    name: "us-east-1".into(),
                    region: "us-east".into(),
                    role: "replica".into(),
                    state: "streaming".into(),
                    timeline: 2,
                    lag_bytes: Some(0),
                    lag_ms: Some(1500),
                    epoch_seen: 3,
                    ..NodeStatus::default()
                },
            ],
            proxies: vec![ProxyStatus {
                id: "px-east".into(),
                region: "us-east".into(),
                listen_addr: "127.0.0.1:6432".into(),
                version: "0.1.0".into(),
            }],
            cache_unusable: Vec::new(),
        }
    }

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn json_shape_has_the_exact_keys() {
        let v = status_json(&status(), None);
        let want: BTreeSet<String> = [
            "cluster",
            "coordinator",
            "active",
            "epoch",
            "leader",
            "state",
            "paused",
            "sync_mode",
            "sync_standbys",
            "nodes",
            "proxies",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(keys(&v), want);
        assert_eq!(v["epoch"], 3);
        assert_eq!(v["leader"], "us-west-1");
        assert_eq!(v["state"], "serving");
        let node = &v["nodes"][0];
        let want_node: BTreeSet<String> = [
            "name",
            "region",
            "role",
            "state",
            "timeline",
            "lag_bytes",
            "lag_ms",
            "pg_addr",
            "member",
            "pg_up",
            "epoch_seen",
            "last_heartbeat_ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(keys(node), want_node);
        // Sorted by name; the example of the brief.
        assert_eq!(node["name"], "us-east-1");
        assert_eq!(node["region"], "us-east");
        assert_eq!(node["role"], "replica");
        assert_eq!(node["state"], "streaming");
        assert_eq!(node["timeline"], 2);
        assert_eq!(node["lag_bytes"], 0);
        assert!(v["nodes"][1]["lag_bytes"].is_null());

        let active = ActiveRef {
            name: "c2".into(),
            admin_addr: "h:1".into(),
        };
        let v = status_json(&ClusterStatus::default(), Some(&active));
        assert_eq!(v["active_coordinator"]["admin_addr"], "h:1");
        assert!(v["leader"].is_null());
    }

    #[test]
    fn table_has_the_patronictl_columns() {
        let text = status_table(&status(), None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Cluster: demo (coordinator c1, active)");
        assert!(lines[1].starts_with("+-"));
        let header: Vec<&str> = lines[2]
            .split('|')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        assert_eq!(
            header,
            [
                "Node",
                "Region",
                "Role",
                "State",
                "TL",
                "Lag (bytes)",
                "Lag (time)",
                "Epoch"
            ]
        );
        // First data row: us-east-1 (sorted), a replica 0 bytes / 1.5 s behind.
        let cells: Vec<&str> = lines[4].split('|').map(str::trim).collect();
        assert_eq!(
            &cells[1..9],
            [
                "us-east-1",
                "us-east",
                "replica",
                "streaming",
                "2",
                "0",
                "1.5 s",
                "3"
            ]
        );
        // The leader is starred.
        assert!(lines[5].contains("us-west-1*"));
        // Every table line has the same width.
        let widths: BTreeSet<usize> = lines[1..7].iter().map(|l| l.chars().count()).collect();
        assert_eq!(widths.len(), 1, "{text}");
        assert!(text.contains(
            "Leader: us-west-1 | State: serving | Epoch: 3 | Sync: on (standbys: us-east-1) | Paused: no"
        ));
        assert!(text.contains("Proxies: px-east (us-east, 127.0.0.1:6432)"));
        let standby = status_table(
            &ClusterStatus::default(),
            Some(&ActiveRef {
                name: "c1".into(),
                admin_addr: "h:9".into(),
            }),
        );
        assert!(standby.contains("Proxies: none"));
        assert!(standby.contains("the active coordinator is c1 at h:9"));
    }

    #[test]
    fn lag_and_event_formatting() {
        assert_eq!(format_lag_ms(0), "0 ms");
        assert_eq!(format_lag_ms(999), "999 ms");
        assert_eq!(format_lag_ms(1250), "1.2 s");
        assert_eq!(format_lag_ms(125_000), "2 min 5 s");
        let line = event_line(&ClusterEvent {
            at_ms: 1_000,
            kind: "promoted".into(),
            node: Some("n2".into()),
            epoch: 4,
            message: "timeline 3".into(),
        });
        assert_eq!(
            line,
            "1970-01-01T00:00:01.000Z promoted node=n2 epoch=4 timeline 3"
        );
    }
}
