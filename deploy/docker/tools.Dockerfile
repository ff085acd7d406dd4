# Demo tools: the load generator and the userspace WAN link (TCP forwarder with delay).
FROM debian:bookworm-slim
COPY docker/apt-install.sh /usr/local/sbin/meridian-apt-install
RUN meridian-apt-install ca-certificates tini
RUN groupadd --system --gid 10001 meridian \
 && useradd --system --uid 10001 --gid meridian --home-dir /nonexistent --shell /usr/sbin/nologin meridian
COPY .bin/meridian-loadgen .bin/meridian-wanlink /usr/local/bin/
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["meridian-loadgen", "--help"]
