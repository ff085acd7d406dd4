//! What the workload did, as a history of operations (JSON lines in the run's directory):
//! who, when (milliseconds since the run started, on one clock), what, and how it ended.

use serde::{Deserialize, Serialize};

/// One operation of one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// `region/role`, e.g. `eu-west/log`.
    pub client: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub kind: Kind,
    pub outcome: Outcome,
}

/// What was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Kind {
    /// `INSERT` of a unique id into the append-only log.
    Insert { id: i64 },
    /// Moves `amount` from account `from` to account `to` in one transaction that also
    /// records the transfer under its unique `id` in the ledger.
    Transfer {
        id: i64,
        from: i32,
        to: i32,
        amount: i64,
    },
    /// The sum of every balance, in one statement (one snapshot).
    ReadTotal,
    /// Increments the register `key` (its session client's own) in session `session`
    /// of the client; the value is the register's new value.
    RegWrite { key: String, session: u32 },
    /// Reads the register `key` in session `session` of the client, which wrote it.
    RegRead { key: String, session: u32 },
    /// Reads the register `key` (another region's) under the causal token of the
    /// increment that started at `written_ms` and returned `after`.
    CausalRead {
        key: String,
        after: i64,
        written_ms: u64,
    },
}

/// How it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged. `epoch`: the `meridian.epoch` of the node that committed a write;
    /// `value`: what a read returned.
    Ok {
        epoch: Option<u64>,
        value: Option<i64>,
    },
    /// Definitely not applied (an error that says so).
    Fail { code: String },
    /// May or may not have been applied (connection lost, class 08/57, timeout).
    Unknown { error: String },
}

/// Whether an error with SQLSTATE `code` leaves the outcome open: the connection or the
/// server went away while the statement may have run (class 08, 57), or nobody answered.
pub fn indeterminate(code: Option<&str>) -> bool {
    match code {
        None => true,
        Some(c) => c.starts_with("08") || c.starts_with("57"),
    }
}

/// The history as JSON lines.
pub fn to_json_lines(ops: &[Op]) -> String {
    let mut out = String::new();
    for op in ops {
        if let Ok(line) = serde_json::to_string(op) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_as_json_lines() {
        let ops = vec![
            Op {
                client: "eu-west/log".into(),
                start_ms: 1,
                end_ms: 3,
                kind: Kind::Insert { id: 7 },
                outcome: Outcome::Ok {
                    epoch: Some(2),
                    value: None,
                },
            },
            Op {
                client: "us-east/bank".into(),
                start_ms: 2,
                end_ms: 9,
                kind: Kind::Transfer {
                    id: 8,
                    from: 1,
                    to: 2,
                    amount: 5,
                },
                outcome: Outcome::Unknown {
                    error: "connection closed".into(),
                },
            },
        ];
        let text = to_json_lines(&ops);
        assert!(text.contains(r#""op":"insert""#), "{text}");
        let back: Vec<Op> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, ops);
    }

    #[test]
    fn which_errors_leave_the_outcome_open() {
        assert!(indeterminate(None));
        assert!(indeterminate(Some("08006")));
        assert!(indeterminate(Some("57P01")));
        assert!(!indeterminate(Some("40001")));
        assert!(!indeterminate(Some("53300")));
    }
}
