//! `meridian-agent`: parses the command line (over the `--config` file, if
//! any), initialises telemetry and runs the agent until SIGTERM or SIGINT (see
//! `meridian_agent::config::Args`).

use std::process::ExitCode;

use meridian_agent::config::{AgentConfig, Args};

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; running until killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Args = meridian_shared::flag_file::parse();
    meridian_shared::telemetry::init();
    let cfg = match AgentConfig::from_args(args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("meridian-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let http = match cfg.http_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("meridian-agent: invalid --http-listen {addr}: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    match meridian_agent::run(cfg, http, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "meridian-agent failed");
            eprintln!("meridian-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
