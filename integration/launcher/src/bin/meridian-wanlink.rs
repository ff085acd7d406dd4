//! `meridian-wanlink`: userspace WAN delay for TCP and UDP (the kernel here has
//! no netem).
//!
//! ```text
//! meridian-wanlink --link 0.0.0.0:5432=us-east-1:5432@40ms --link 0.0.0.0:5434=eu-west-1:5434@70ms \
//!                  --udp-link 0.0.0.0:7410=coordinator-1:7400@40ms
//! ```
//! Each `--link LISTEN=TARGET@DELAY` forwards TCP connections accepted on LISTEN
//! to TARGET, delaying every chunk by DELAY in each direction (so a round trip
//! costs twice DELAY). Each `--udp-link LISTEN=TARGET@DELAY` relays UDP
//! datagrams (the agents' QUIC to a coordinator) the same way, one upstream
//! socket per client address. Targets are resolved per connection or new UDP
//! client, so a target may start after the link. `--jitter` adds up to that
//! much extra per chunk or datagram, without reordering.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meridian_launcher::wanlink::{Link, LinkControl, UdpLink};

#[derive(Parser, Debug)]
#[command(version, about = "Userspace WAN delay for TCP and UDP links")]
struct Args {
    /// TCP link `LISTEN=TARGET@DELAY`, e.g. `0.0.0.0:5432=us-east-1:5432@40ms`;
    /// repeatable or comma-separated.
    #[arg(
        long = "link",
        env = "MERIDIAN_WANLINK_LINKS",
        value_delimiter = ',',
        required_unless_present = "udp_links"
    )]
    links: Vec<String>,
    /// UDP link `LISTEN=TARGET@DELAY`, e.g. `0.0.0.0:7410=coordinator-1:7400@40ms`;
    /// repeatable or comma-separated.
    #[arg(
        long = "udp-link",
        env = "MERIDIAN_WANLINK_UDP_LINKS",
        value_delimiter = ','
    )]
    udp_links: Vec<String>,
    /// Extra random delay per chunk, at most this much (default 0ms).
    #[arg(long, env = "MERIDIAN_WANLINK_JITTER", default_value = "0ms")]
    jitter: humantime::Duration,
}

/// `LISTEN=TARGET@DELAY` of `flag` (named in the error).
fn parse_link(flag: &str, spec: &str) -> anyhow::Result<(String, String, Duration)> {
    let (listen, rest) = spec
        .split_once('=')
        .with_context(|| format!("{flag} {spec:?}: expected LISTEN=TARGET@DELAY"))?;
    let (target, delay) = rest
        .rsplit_once('@')
        .with_context(|| format!("{flag} {spec:?}: expected LISTEN=TARGET@DELAY"))?;
    let delay = humantime::parse_duration(delay)
        .with_context(|| format!("{flag} {spec:?}: bad delay {delay:?}"))?;
    Ok((listen.to_owned(), target.to_owned(), delay))
}

async fn listen_addr(flag: &str, spec: &str, listen: &str) -> anyhow::Result<std::net::SocketAddr> {
    tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("{flag} {spec:?}: cannot resolve {listen}"))?
        .next()
        .with_context(|| format!("{flag} {spec:?}: {listen} resolves to nothing"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    meridian_shared::telemetry::init();
    let args = Args::parse();
    let mut tcp = Vec::new();
    for spec in &args.links {
        let (listen, target, delay) = parse_link("--link", spec)?;
        let control = LinkControl::new(delay, *args.jitter);
        let link = Link::start(
            listen_addr("--link", spec, &listen).await?,
            target.clone(),
            control,
        )
        .await
        .with_context(|| format!("--link {spec:?}: cannot listen on {listen}"))?;
        tracing::info!(listen = %link.local_addr(), %target, ?delay, "wan link up (tcp)");
        tcp.push(link);
    }
    let mut udp = Vec::new();
    for spec in &args.udp_links {
        let (listen, target, delay) = parse_link("--udp-link", spec)?;
        let control = LinkControl::new(delay, *args.jitter);
        let link = UdpLink::start(
            listen_addr("--udp-link", spec, &listen).await?,
            target.clone(),
            control,
        )
        .await
        .with_context(|| format!("--udp-link {spec:?}: cannot listen on {listen}"))?;
        tracing::info!(listen = %link.local_addr(), %target, ?delay, "wan link up (udp)");
        udp.push(link);
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
        let (l, t, d) = parse_link("--link", "0.0.0.0:5432=us-east-1:5432@40ms").unwrap();
        assert_eq!(
            (l.as_str(), t.as_str(), d),
            ("0.0.0.0:5432", "us-east-1:5432", Duration::from_millis(40))
        );
        let e = parse_link("--link", "0.0.0.0:5432")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--link"), "{e}");
        let e = parse_link("--udp-link", "a=b@soon")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--udp-link") && e.contains("bad delay"), "{e}");
    }
}
