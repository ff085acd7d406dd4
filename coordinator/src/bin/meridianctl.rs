//! `meridianctl`: the operator CLI of a Meridian cluster (see
//! `meridian_coordinator::ctl`). Exit codes: 0 ok, 1 refused or failed,
//! 2 usage, 3 cannot reach the cluster.

use clap::Parser;
use meridian_coordinator::ctl::{self, Cli};

fn main() {
    // clap exits with 2 on a usage error and 0 for --help/--version.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meridianctl: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(ctl::run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("meridianctl: {e}");
            e.exit_code()
        }
    };
    // Do not wait for background tasks (e.g. a followed event stream).
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}
