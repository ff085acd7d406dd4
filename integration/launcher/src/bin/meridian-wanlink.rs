//! `meridian-wanlink`: userspace WAN delay for TCP (the kernel here has no netem).
//!
//! ```text
//! meridian-wanlink --link 0.0.0.0:5432=us-east-1:5432@40ms --link 0.0.0.0:5434=eu-west-1:5434@70ms
//! ```
//! Each `--link LISTEN=TARGET@DELAY` forwards TCP connections accepted on LISTEN
//! to TARGET, delaying every chunk by DELAY in each direction (so a round trip
//! costs twice DELAY). `--jitter` adds up to that much extra per chunk, without
//! reordering.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meridian_launcher::wanlink::{Link, LinkControl};

#[derive(Parser, Debug)]
#[command(version, about = "Userspace WAN delay for TCP links")]
struct Args {
    /// `LISTEN=TARGET@DELAY`, e.g. `0.0.0.0:5432=us-east-1:5432@40ms`; repeatable.
    #[arg(
        long = "link",
        env = "MERIDIAN_WANLINK_LINKS",
        value_delimiter = ',',
        required = true
    )]
    links: Vec<String>,
    /// Extra random delay per chunk, at most this much (default 0ms).
    #[arg(long, env = "MERIDIAN_WANLINK_JITTER", default_value = "0ms")]
    jitter: humantime::Duration,
}

fn parse_link(spec: &str) -> anyhow::Result<(String, String, Duration)> {
    let (listen, rest) = spec
        .split_once('=')
        .with_context(|| format!("--link {spec:?}: expected LISTEN=TARGET@DELAY"))?;
    let (target, delay) = rest
        .rsplit_once('@')
        .with_context(|| format!("--link {spec:?}: expected LISTEN=TARGET@DELAY"))?;
    let delay = humantime::parse_duration(delay)
        .with_context(|| format!("--link {spec:?}: bad delay {delay:?}"))?;
    Ok((listen.to_owned(), target.to_owned(), delay))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    meridian_shared::telemetry::init();
    let args = Args::parse();
    let mut running = Vec::new();
    for spec in &args.links {
        let (listen, target, delay) = parse_link(spec)?;
        let listen_addr = tokio::net::lookup_host(&listen)
            .await
            .with_context(|| format!("--link {spec:?}: cannot resolve {listen}"))?
            .next()
            .with_context(|| format!("--link {spec:?}: {listen} resolves to nothing"))?;
        let link = Link::start(
            listen_addr,
            target.clone(),
            LinkControl::new(delay, *args.jitter),
        )
        .await
        .with_context(|| format!("--link {spec:?}: cannot listen on {listen}"))?;
        tracing::info!(listen = %link.local_addr(), %target, ?delay, "wan link up");
        running.push(link);
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn link_specs_parse_and_bad_ones_name_the_flag() {
        let (l, t, d) = parse_link("0.0.0.0:5432=us-east-1:5432@40ms").unwrap();
        assert_eq!(
            (l.as_str(), t.as_str(), d),
            ("0.0.0.0:5432", "us-east-1:5432", Duration::from_millis(40))
        );
        let e = parse_link("0.0.0.0:5432").unwrap_err().to_string();
        assert!(e.contains("--link"), "{e}");
        let e = parse_link("a=b@soon").unwrap_err().to_string();
        assert!(e.contains("bad delay"), "{e}");
    }
}
