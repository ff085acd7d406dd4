# pgproxy: the region's (or the pod's) Postgres wire-protocol proxy.
FROM debian:bookworm-slim
COPY docker/apt-install.sh /usr/local/sbin/meridian-apt-install
RUN meridian-apt-install ca-certificates tini
COPY docker/healthcheck.sh /usr/local/bin/meridian-healthcheck
RUN groupadd --system --gid 10001 meridian \
 && useradd --system --uid 10001 --gid meridian --home-dir /nonexistent --shell /usr/sbin/nologin meridian
COPY .bin/meridian-pgproxy /usr/local/bin/meridian-pgproxy
ENV MERIDIAN_PGPROXY_LISTEN=0.0.0.0:6432 \
    MERIDIAN_PGPROXY_ADMIN_LISTEN=0.0.0.0:9187
USER 10001:10001
EXPOSE 6432 9187
HEALTHCHECK --interval=2s --timeout=3s --retries=3 --start-period=120s CMD ["meridian-healthcheck", "9187", "/health"]
ENTRYPOINT ["/usr/bin/tini", "--", "meridian-pgproxy"]
