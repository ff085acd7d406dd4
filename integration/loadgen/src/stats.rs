//! Per-interval counters of the load generator and the one line it prints per
//! interval. Pure: callers pass the instants in, so the windowing and the
//! formatting are unit-tested without a clock or a database.

use std::collections::BTreeMap;
use std::time::Duration;

/// Where a read was served, as reported by the server that ran it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServedBy(pub String);

/// Maps server ports to names (`5432=us-east,5433=us-west`), for servers whose
/// `cluster_name` is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortNames(BTreeMap<i32, String>);

impl PortNames {
    /// Parses `PORT=NAME[,PORT=NAME...]`; the empty string gives no names.
    pub fn parse(spec: &str) -> Result<PortNames, String> {
        let mut map = BTreeMap::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (port, name) = item
                .split_once('=')
                .ok_or_else(|| format!("--port-names: `{item}` is not PORT=NAME"))?;
            let port: i32 = port
                .trim()
                .parse()
                .map_err(|_| format!("--port-names: `{port}` is not a port number"))?;
            let name = name.trim();
            if name.is_empty() {
                return Err(format!("--port-names: port {port} has an empty name"));
            }
            map.insert(port, name.to_string());
        }
        Ok(PortNames(map))
    }

    /// The label of a server: its `cluster_name` when set, else the configured
    /// name of its port, else `port:<n>`.
    pub fn label(&self, cluster_name: Option<&str>, port: Option<i32>) -> ServedBy {
        if let Some(name) = cluster_name.filter(|n| !n.is_empty()) {
            return ServedBy(name.to_string());
        }
        match port {
            Some(p) => ServedBy(
                self.0
                    .get(&p)
                    .cloned()
                    .unwrap_or_else(|| format!("port:{p}")),
            ),
            None => ServedBy("unknown".into()),
        }
    }
}

/// The outcome of one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A committed write, with its latency.
    Commit(Duration),
    /// A read, where it was served and whether that server was in recovery.
    Read {
        served_by: ServedBy,
        replica: bool,
        latency: Duration,
    },
    /// A failed operation (write or read) with a short reason (SQLSTATE or kind).
    Error(String),
}

/// Counters of one interval plus running totals.
#[derive(Debug, Default)]
pub struct Stats {
    commits: u64,
    reads: u64,
    errors: u64,
    served: BTreeMap<ServedBy, u64>,
    write_latencies: Vec<Duration>,
    read_latencies: Vec<Duration>,
    last_error: Option<String>,
    total_commits: u64,
    total_reads: u64,
    total_errors: u64,
    replica_reads: u64,
}

impl Stats {
    pub fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Commit(latency) => {
                self.commits += 1;
                self.total_commits += 1;
                self.write_latencies.push(latency);
            }
            Outcome::Read {
                served_by,
                replica,
                latency,
            } => {
                self.reads += 1;
                self.total_reads += 1;
                if replica {
                    self.replica_reads += 1;
                }
                *self.served.entry(served_by).or_default() += 1;
                self.read_latencies.push(latency);
            }
            Outcome::Error(reason) => {
                self.errors += 1;
                self.total_errors += 1;
                self.last_error = Some(reason);
            }
        }
    }

    /// The line for the interval that ends now (`elapsed` since start), and a
    /// reset of the per-interval counters. Totals carry on.
    pub fn take_line(&mut self, region: &str, elapsed: Duration) -> String {
        let served = if self.served.is_empty() {
            "-".to_string()
        } else {
            self.served
                .iter()
                .map(|(k, v)| format!("{}:{v}", k.0))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut line = format!(
            "loadgen region={region} t={}s commits={} reads={} errors={} read_from={served} replica_reads={} write_p50={} read_p50={} total_commits={} total_reads={} total_errors={}",
            elapsed.as_secs(),
            self.commits,
            self.reads,
            self.errors,
            self.replica_reads,
            fmt_ms(median(&mut self.write_latencies)),
            fmt_ms(median(&mut self.read_latencies)),
            self.total_commits,
            self.total_reads,
            self.total_errors,
        );
        if self.errors > 0 {
            if let Some(e) = &self.last_error {
                line.push_str(&format!(" last_error=\"{}\"", e.replace('"', "'")));
            }
        }
        self.commits = 0;
        self.reads = 0;
        self.errors = 0;
        self.replica_reads = 0;
        self.served.clear();
        self.write_latencies.clear();
        self.read_latencies.clear();
        self.last_error = None;
        line
    }
}

fn median(samples: &mut [Duration]) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    Some(samples[samples.len() / 2])
}

fn fmt_ms(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.1}ms", d.as_secs_f64() * 1000.0),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_parse_and_label() {
        let names = PortNames::parse("5432=us-east, 5433=us-west").unwrap_or_default();
        assert_eq!(names.label(None, Some(5433)).0, "us-west");
        assert_eq!(names.label(Some(""), Some(5432)).0, "us-east");
        assert_eq!(names.label(Some("node-eu"), Some(5432)).0, "node-eu");
        assert_eq!(names.label(None, Some(9999)).0, "port:9999");
        assert_eq!(names.label(None, None).0, "unknown");
        assert!(PortNames::parse("").is_ok());
        assert!(PortNames::parse("5432").is_err());
        assert!(PortNames::parse("x=us").is_err());
        assert!(PortNames::parse("5432=").is_err());
    }

    #[test]
    fn line_counts_the_interval_and_keeps_totals() {
        let mut s = Stats::default();
        s.record(Outcome::Commit(Duration::from_millis(80)));
        s.record(Outcome::Commit(Duration::from_millis(90)));
        s.record(Outcome::Commit(Duration::from_millis(100)));
        for _ in 0..3 {
            s.record(Outcome::Read {
                served_by: ServedBy("eu-west".into()),
                replica: true,
                latency: Duration::from_millis(2),
            });
        }
        s.record(Outcome::Read {
            served_by: ServedBy("us-east".into()),
            replica: false,
            latency: Duration::from_millis(80),
        });
        s.record(Outcome::Error("08006".into()));
        let line = s.take_line("eu-west", Duration::from_secs(7));
        assert!(
            line.starts_with("loadgen region=eu-west t=7s commits=3 reads=4 errors=1 "),
            "{line}"
        );
        assert!(line.contains("read_from=eu-west:3,us-east:1"), "{line}");
        assert!(line.contains("replica_reads=3"), "{line}");
        assert!(line.contains("write_p50=90.0ms"), "{line}");
        assert!(line.contains("last_error=\"08006\""), "{line}");

        let line = s.take_line("eu-west", Duration::from_secs(8));
        assert!(
            line.contains("commits=0 reads=0 errors=0 read_from=-"),
            "{line}"
        );
        assert!(
            line.contains("total_commits=3 total_reads=4 total_errors=1"),
            "{line}"
        );
        assert!(!line.contains("last_error"), "{line}");
    }
}
