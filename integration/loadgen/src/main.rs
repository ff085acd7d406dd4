//! `meridian-loadgen`: the docker-compose demo's load generator. `run` writes and
//! reads through a region's pgproxy with tokio-postgres and prints one line per
//! interval (commits, reads, errors, where reads were served); `query` runs SQL
//! once through the same connection string and prints the rows (the demo
//! scenario uses it to write in one region and read back there).
//!
//! Limits: one writer and one reader connection (sequential operations at the
//! configured rates), so it shows behaviour, it is not a benchmark.

mod stats;
mod workload;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Meridian demo load generator.
#[derive(Parser, Debug)]
#[command(name = "meridian-loadgen", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write and read continuously, printing one line per interval.
    Run(RunArgs),
    /// Run SQL once (simple query protocol) and print the rows, tab-separated.
    Query(QueryArgs),
}

#[derive(Args, Debug)]
struct Conn {
    /// libpq-style connection string of the region's proxy.
    #[arg(
        long,
        env = "MERIDIAN_LOADGEN_URL",
        default_value = "host=127.0.0.1 port=6432 user=postgres dbname=postgres"
    )]
    url: String,
    /// Timeout of each connect and each statement.
    #[arg(long, env = "MERIDIAN_LOADGEN_OP_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    op_timeout: Duration,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    conn: Conn,
    /// Region name written with each row and printed on each line.
    #[arg(long, env = "MERIDIAN_LOADGEN_REGION", default_value = "local")]
    region: String,
    /// Committed writes per second (0 disables writes).
    #[arg(long, env = "MERIDIAN_LOADGEN_WRITES", default_value_t = 5)]
    writes: u32,
    /// Reads per second (0 disables reads).
    #[arg(long, env = "MERIDIAN_LOADGEN_READS", default_value_t = 20)]
    reads: u32,
    /// Length of a reporting interval.
    #[arg(long, env = "MERIDIAN_LOADGEN_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Names of servers by port, used when a server's cluster_name is empty: `5432=us-east,5433=us-west`.
    #[arg(long, env = "MERIDIAN_LOADGEN_PORT_NAMES", default_value = "")]
    port_names: String,
    /// Stop after this long (default: run until SIGTERM/SIGINT).
    #[arg(long, env = "MERIDIAN_LOADGEN_DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

#[derive(Args, Debug)]
struct QueryArgs {
    #[command(flatten)]
    conn: Conn,
    /// Keep retrying (connect and statement) until this much time has passed.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    retry_for: Duration,
    /// The SQL to run (several statements allowed).
    sql: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => {
            let port_names = match stats::PortNames::parse(&a.port_names) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("meridian-loadgen: {e}");
                    return ExitCode::from(2);
                }
            };
            workload::run(workload::RunConfig {
                url: a.conn.url,
                op_timeout: a.conn.op_timeout,
                region: a.region,
                writes_per_sec: a.writes,
                reads_per_sec: a.reads,
                interval: a.interval,
                port_names,
                duration: a.duration,
            })
            .await
        }
        Command::Query(a) => {
            workload::query_once(&a.conn.url, a.conn.op_timeout, a.retry_for, &a.sql).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meridian-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
