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

/// One `--link` / `--udp-link` item: where to listen (resolved), the target,
/// and the link's delay control.
struct LinkSpec {
    listen: std::net::SocketAddr,
    target: String,
    control: LinkControl,
}

/// Parses `spec` of `flag` and resolves its listen address.
async fn link_spec(flag: &str, spec: &str, jitter: Duration) -> anyhow::Result<LinkSpec> {
    let (listen, target, delay) = parse_link(flag, spec)?;
    let addr = tokio::net::lookup_host(&listen)
        .await
        .with_context(|| format!("{flag} {spec:?}: cannot resolve {listen}"))?
        .next()
        .with_context(|| format!("{flag} {spec:?}: {listen} resolves to nothing"))?;
    Ok(LinkSpec {
        listen: addr,
        target,
        control: LinkControl::new(delay, jitter),
    })
}

/// A link this process runs (kept alive until it exits).
enum Running {
    Tcp(Link),
    Udp(UdpLink),
}

impl Running {
    fn local_addr(&self) -> std::net::SocketAddr {
        match self {
            Running::Tcp(l) => l.local_addr(),
            Running::Udp(l) => l.local_addr(),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    meridian_shared::telemetry::init();
    let args = Args::parse();
    let items = (args.links.iter().map(|s| ("--link", s)))
        .chain(args.udp_links.iter().map(|s| ("--udp-link", s)));
    let mut running = Vec::new();
    for (flag, spec) in items {
        let l = link_spec(flag, spec, *args.jitter).await?;
        let delay = l.control.state().delay;
        let started = if flag == "--link" {
            Link::start(l.listen, l.target.clone(), l.control)
                .await
                .map(Running::Tcp)
        } else {
            UdpLink::start(l.listen, l.target.clone(), l.control)
                .await
                .map(Running::Udp)
        }
        .with_context(|| format!("{flag} {spec:?}: cannot listen on {}", l.listen))?;
        tracing::info!(listen = %started.local_addr(), target = %l.target, ?delay, flag, "wan link up");
        running.push(started);
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
