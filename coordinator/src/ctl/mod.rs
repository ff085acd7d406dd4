//! `meridianctl`, the operator CLI over the coordinator's gRPC admin API
//! ([`crate::admin`]), plus `certs` (a development PKI) and `local` (the local
//! multi-region cluster of `meridian-launcher`).
//!
//! Connection flags may be given before the subcommand or after it (after wins);
//! environment variables apply to the former. See [`discover`] for how the
//! coordinator is found. Exit codes: 0 ok, 1 the operation was refused or
//! failed, 2 usage, 3 the cluster cannot be reached.
//!
//! `events` prints the events the coordinator has kept since it started (the
//! last `--recent`, default 50) and exits; with `--follow` it then keeps
//! printing new events until interrupted (exit 0) or until the coordinator ends
//! the stream (exit 3).

pub mod discover;
pub mod render;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use tonic::Code;

use crate::admin::{self, proto, settings};
use discover::Target;
use render::ActiveRef;

/// Failure of a `meridianctl` command, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The operation was refused or failed (exit 1).
    #[error("{0}")]
    Failed(String),
    /// Bad invocation (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The cluster cannot be reached (exit 3).
    #[error("{0}")]
    Unreachable(String),
}

impl CtlError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CtlError::Failed(_) => 1,
            CtlError::Usage(_) => 2,
            CtlError::Unreachable(_) => 3,
        }
    }

    /// Maps a gRPC error of an RPC sent to `addr`.
    fn from_status(what: &str, addr: &str, status: &tonic::Status) -> CtlError {
        let text = format!("{what}: {}", status.message());
        match status.code() {
            Code::Unavailable => CtlError::Unreachable(format!("{text} (coordinator {addr})")),
            Code::InvalidArgument => CtlError::Usage(text),
            _ => CtlError::Failed(text),
        }
    }
}

/// How to reach the cluster (see [`discover`]); environment variables apply.
#[derive(Args, Clone, Debug, Default)]
pub struct ConnArgs {
    /// gRPC admin address of a coordinator, `host:port`; used as given.
    #[arg(long, env = "MERIDIANCTL_ADMIN", value_name = "ADDR")]
    pub admin: Option<String>,
    /// etcd client URLs, comma-separated; with --cluster, the active coordinator
    /// is read from the election.
    #[arg(
        long,
        env = "MERIDIANCTL_ETCD",
        value_name = "URLS",
        value_delimiter = ','
    )]
    pub etcd: Vec<String>,
    /// Cluster name (the etcd prefix `/meridian/<cluster>/`), with --etcd.
    #[arg(long, env = "MERIDIANCTL_CLUSTER", value_name = "NAME")]
    pub cluster: Option<String>,
    /// Directory of a local cluster (`meridianctl local up --dir`): reads
    /// DIR/cluster.json and uses the active one of its coordinators.
    #[arg(long, env = "MERIDIANCTL_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The same flags after a subcommand (no environment: those apply once, above).
#[derive(Args, Clone, Debug, Default)]
pub struct ConnOverride {
    /// gRPC admin address of a coordinator, `host:port`.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// etcd client URLs, comma-separated (with --cluster).
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Cluster name, with --etcd.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Directory of a local cluster (DIR/cluster.json).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl ConnArgs {
    /// These settings with `over` (flags after the subcommand) taking precedence.
    pub fn merged(&self, over: &ConnOverride) -> Target {
        Target {
            admin: over.admin.clone().or_else(|| self.admin.clone()),
            dir: over.dir.clone().or_else(|| self.dir.clone()),
            etcd: if over.etcd.is_empty() {
                self.etcd.clone()
            } else {
                over.etcd.clone()
            },
            cluster: over.cluster.clone().or_else(|| self.cluster.clone()),
        }
    }
}

/// The operator CLI of a Meridian cluster.
#[derive(Parser, Debug)]
#[command(name = "meridianctl", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub cmd: Command,
}

/// `meridianctl` subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Nodes, roles, lag, leader and proxies (a table like `patronictl list`).
    Status {
        /// Print JSON: {"epoch", "leader", "state", "nodes": [{"name", "region",
        /// "role", "state", "timeline", "lag_bytes", ...}], ...}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnOverride,
    },
    /// Planned, zero-loss change of primary.
    Switchover {
        /// Target node (default: the best replica).
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
        #[command(flatten)]
        conn: ConnOverride,
    },
    /// Promote NODE now, even though the primary may be healthy.
    Failover {
        /// The node to promote.
        #[arg(long, value_name = "NODE")]
        to: String,
        /// Also accept a lagging or `nofailover` target.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: ConnOverride,
    },
    /// Disable automatic failover (maintenance).
    Pause {
        #[command(flatten)]
        conn: ConnOverride,
    },
    /// Re-enable automatic failover.
    Resume {
        #[command(flatten)]
        conn: ConnOverride,
    },
    /// Recent cluster events, one per line; with --follow, then new ones until Ctrl-C.
    Events {
        /// Keep printing new events until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many of the recent events to print first.
        #[arg(long, default_value_t = 50, value_name = "N")]
        recent: u32,
        #[command(flatten)]
        conn: ConnOverride,
    },
    /// Dynamic cluster settings (etcd `config`).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Mint a development CA and node certificates (for the QUIC link).
    Certs {
        /// Directory to write ca.pem, ca-key.pem, NAME.pem and NAME-key.pem into.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Comma-separated names to make certificates for (nodes and coordinators).
        #[arg(long, value_delimiter = ',', required = true, value_name = "NAMES")]
        names: Vec<String>,
    },
    /// A local multi-region cluster on loopback.
    Local(meridian_launcher::LocalArgs),
}

/// `meridianctl config …`
#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the config as JSON, or the value of one KEY.
    Get {
        key: Option<String>,
        #[command(flatten)]
        conn: ConnOverride,
    },
    /// Change settings: KEY=VALUE… (e.g. `failover_hold=5s sync_mode=on`), or
    /// replace the whole config with --json (missing keys take their defaults;
    /// KEY=VALUE pairs are then applied on top).
    Set {
        #[arg(required_unless_present = "json", value_name = "KEY=VALUE")]
        assignments: Vec<String>,
        /// A whole cluster config as JSON, e.g. '{"paused":true,"failover_hold":"5s"}'.
        #[arg(long, value_name = "JSON")]
        json: Option<String>,
        #[command(flatten)]
        conn: ConnOverride,
    },
}

/// Timeouts of the RPCs (connecting has its own 2 s).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn request<T>(message: T, timeout: Option<Duration>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    req
}

/// Parses `KEY=VALUE` arguments of `config set` into settings.
pub fn parse_assignments(args: &[String]) -> Result<Vec<proto::Setting>, CtlError> {
    args.iter()
        .map(|a| {
            settings::parse_assignment(a)
                .map(|(key, value)| proto::Setting { key, value })
                .map_err(|e| CtlError::Usage(format!("config set: {e}")))
        })
        .collect()
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| json.to_string())
}

/// Runs one command, printing its output to stdout.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let top = cli.conn;
    match cli.cmd {
        Command::Certs { dir, names } => {
            let names: Vec<&str> = names
                .iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .collect();
            for name in &names {
                meridian_shared::keys::validate_name(name)
                    .map_err(|e| CtlError::Usage(format!("--names: {e}")))?;
            }
            meridian_shared::pki::write_dev_pki(&dir, &names)
                .map_err(|e| CtlError::Failed(format!("certs: {e}")))?;
            println!("{}", dir.join("ca.pem").display());
            println!("{}", dir.join("ca-key.pem").display());
            for name in names {
                let paths = meridian_shared::pki::PkiPaths::in_dir(&dir, name);
                println!("{}", paths.cert.display());
                println!("{}", paths.key.display());
            }
            Ok(())
        }
        Command::Local(args) => {
            meridian_shared::telemetry::init();
            meridian_launcher::run(args)
                .await
                .map_err(|e| CtlError::Failed(format!("local: {e:#}")))
        }
        Command::Status { json, conn } => {
            let mut c = discover::discover(&top.merged(&conn)).await?;
            let reply = c
                .client
                .get_status(request(proto::GetStatusRequest {}, Some(READ_TIMEOUT)))
                .await
                .map_err(|e| CtlError::from_status("status", &c.addr, &e))?
                .into_inner();
            let active = (!reply.active).then(|| ActiveRef {
                name: reply.active_coordinator.clone(),
                admin_addr: reply.active_admin_addr.clone(),
            });
            let status = admin::status_from_proto(reply);
            if json {
                let doc = render::status_json(&status, active.as_ref());
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc)
                        .map_err(|e| CtlError::Failed(e.to_string()))?
                );
            } else {
                print!("{}", render::status_table(&status, active.as_ref()));
            }
            Ok(())
        }
        Command::Switchover { to, conn } => {
            let mut c = discover::discover(&top.merged(&conn)).await?;
            let reply = c
                .client
                .switchover(request(
                    proto::SwitchoverRequest { to },
                    Some(admin::OPERATION_TIMEOUT + Duration::from_secs(10)),
                ))
                .await
                .map_err(|e| CtlError::from_status("switchover refused", &c.addr, &e))?;
            println!("{}", reply.into_inner().message);
            Ok(())
        }
        Command::Failover { to, force, conn } => {
            let mut c = discover::discover(&top.merged(&conn)).await?;
            let reply = c
                .client
                .failover(request(
                    proto::FailoverRequest { to, force },
                    Some(admin::OPERATION_TIMEOUT + Duration::from_secs(10)),
                ))
                .await
                .map_err(|e| CtlError::from_status("failover refused", &c.addr, &e))?;
            println!("{}", reply.into_inner().message);
            Ok(())
        }
        Command::Pause { conn } => {
            let mut c = discover::discover(&top.merged(&conn)).await?;
            let reply = c
                .client
                .pause(request(proto::PauseRequest {}, Some(READ_TIMEOUT)))
                .await
                .map_err(|e| CtlError::from_status("pause refused", &c.addr, &e))?
                .into_inner();
            println!(
                "{}",
                if reply.changed {
                    "automatic failover paused"
                } else {
                    "automatic failover was already paused"
                }
            );
            Ok(())
        }
        Command::Resume { conn } => {
            let mut c = discover::discover(&top.merged(&conn)).await?;
            let reply = c
                .client
                .resume(request(proto::ResumeRequest {}, Some(READ_TIMEOUT)))
                .await
                .map_err(|e| CtlError::from_status("resume refused", &c.addr, &e))?
                .into_inner();
            println!(
                "{}",
                if reply.changed {
                    "automatic failover resumed"
                } else {
                    "automatic failover was not paused"
                }
            );
            Ok(())
        }
        Command::Events {
            follow,
            recent,
            conn,
        } => {
            let mut c = discover::discover(&top.merged(&conn)).await?;
            let timeout = (!follow).then_some(READ_TIMEOUT);
            let mut stream = c
                .client
                .events(request(proto::EventsRequest { recent, follow }, timeout))
                .await
                .map_err(|e| CtlError::from_status("events", &c.addr, &e))?
                .into_inner();
            let mut stdout = std::io::stdout();
            loop {
                let next = tokio::select! {
                    next = stream.next() => next,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                match next {
                    None if follow => {
                        return Err(CtlError::Unreachable(format!(
                            "the coordinator at {} ended the event stream (shutting down?)",
                            c.addr
                        )))
                    }
                    None => return Ok(()),
                    Some(Ok(event)) => {
                        let line = render::event_line(&admin::event_from_proto(event));
                        // A closed stdout (e.g. `| head`) ends the command quietly.
                        if writeln!(stdout, "{line}")
                            .and_then(|()| stdout.flush())
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                    Some(Err(e)) => return Err(CtlError::from_status("events", &c.addr, &e)),
                }
            }
        }
        Command::Config { cmd } => match cmd {
            ConfigCmd::Get { key, conn } => {
                let mut c = discover::discover(&top.merged(&conn)).await?;
                let reply = c
                    .client
                    .get_config(request(proto::GetConfigRequest {}, Some(READ_TIMEOUT)))
                    .await
                    .map_err(|e| CtlError::from_status("config get", &c.addr, &e))?
                    .into_inner();
                match key {
                    None => println!("{}", pretty(&reply.json)),
                    Some(key) => {
                        let doc: serde_json::Value = serde_json::from_str(&reply.json)
                            .map_err(|e| CtlError::Failed(format!("config get: {e}")))?;
                        let value = doc.get(&key).ok_or_else(|| {
                            CtlError::Usage(format!(
                                "unknown config key `{key}` (known: {})",
                                settings::known_keys().join(", ")
                            ))
                        })?;
                        match value {
                            serde_json::Value::String(s) => println!("{s}"),
                            other => println!("{other}"),
                        }
                    }
                }
                Ok(())
            }
            ConfigCmd::Set {
                assignments,
                json,
                conn,
            } => {
                let settings = parse_assignments(&assignments)?;
                let mut c = discover::discover(&top.merged(&conn)).await?;
                let reply = c
                    .client
                    .set_config(request(
                        proto::SetConfigRequest {
                            json: json.unwrap_or_default(),
                            settings,
                        },
                        Some(READ_TIMEOUT),
                    ))
                    .await
                    .map_err(|e| CtlError::from_status("config set refused", &c.addr, &e))?
                    .into_inner();
                println!("{}", pretty(&reply.json));
                Ok(())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_set_arguments() {
        let parsed =
            parse_assignments(&["paused=true".into(), "failover_hold = 5s".into()]).unwrap();
        assert_eq!(
            parsed
                .iter()
                .map(|s| (s.key.as_str(), s.value.as_str()))
                .collect::<Vec<_>>(),
            [("paused", "true"), ("failover_hold", "5s")]
        );
        let err = parse_assignments(&["paused".into()]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("KEY=VALUE"));
        let cli = Cli::try_parse_from(["meridianctl", "config", "set", "a=1", "b=2"]).unwrap();
        assert!(matches!(
            cli.cmd,
            Command::Config { cmd: ConfigCmd::Set { ref assignments, .. } } if assignments.len() == 2
        ));
    }

    #[test]
    fn connection_flags_before_or_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "meridianctl",
            "--admin",
            "a:1",
            "--etcd",
            "http://e1:2379,http://e2:2379",
            "status",
            "--admin",
            "b:2",
            "--json",
        ])
        .unwrap();
        let Command::Status { json, conn } = &cli.cmd else {
            panic!("not status: {:?}", cli.cmd)
        };
        assert!(json);
        let target = cli.conn.merged(conn);
        assert_eq!(target.admin.as_deref(), Some("b:2"));
        assert_eq!(target.etcd, ["http://e1:2379", "http://e2:2379"]);
        // `certs --dir` is the certificate directory, not the cluster directory.
        let cli =
            Cli::try_parse_from(["meridianctl", "certs", "--dir", "/tmp/x", "--names", "a,b"])
                .unwrap();
        assert!(matches!(cli.cmd, Command::Certs { ref names, .. } if names == &["a", "b"]));
        assert!(Cli::try_parse_from(["meridianctl", "failover"]).is_err());
        assert!(Cli::try_parse_from(["meridianctl", "config", "set"]).is_err());
        let cli = Cli::try_parse_from(["meridianctl", "config", "set", "--json", "{}"]).unwrap();
        assert!(matches!(
            cli.cmd,
            Command::Config { cmd: ConfigCmd::Set { ref json, ref assignments, .. } }
                if json.as_deref() == Some("{}") && assignments.is_empty()
        ));
    }
}
