# Coordinator: meridian-coordinator (entrypoint) and the operator CLI meridianctl.
FROM debian:bookworm-slim
COPY docker/apt-install.sh /usr/local/sbin/meridian-apt-install
RUN meridian-apt-install ca-certificates tini
COPY docker/healthcheck.sh /usr/local/bin/meridian-healthcheck
RUN groupadd --system --gid 10100 meridian-certs \
 && groupadd --system --gid 10001 meridian \
 && useradd --system --uid 10001 --gid meridian --groups meridian-certs --home-dir /nonexistent --shell /usr/sbin/nologin meridian
COPY .bin/meridian-coordinator .bin/meridianctl /usr/local/bin/
ENV MERIDIAN_COORDINATOR_QUIC_LISTEN=0.0.0.0:7400 \
    MERIDIAN_COORDINATOR_ADMIN_LISTEN=0.0.0.0:7401 \
    MERIDIAN_COORDINATOR_HTTP_LISTEN=0.0.0.0:8080
USER 10001:10001
EXPOSE 7400/udp 7401 8080
HEALTHCHECK --interval=2s --timeout=3s --retries=3 --start-period=60s CMD ["meridian-healthcheck", "8080", "/health"]
ENTRYPOINT ["/usr/bin/tini", "--", "meridian-coordinator"]
