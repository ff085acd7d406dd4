# Postgres node: PostgreSQL 15 supervised by meridian-agent (the entrypoint).
# The agent runs as the unprivileged `postgres` user and starts initdb,
# pg_basebackup, pg_rewind and the postmaster as itself.
FROM debian:bookworm-slim
COPY docker/apt-install.sh /usr/local/sbin/meridian-apt-install
RUN meridian-apt-install ca-certificates tini procps postgresql-15
COPY docker/healthcheck.sh /usr/local/bin/meridian-healthcheck
COPY docker/fix-uid.sh /usr/local/sbin/meridian-fix-uid
# Group that may read the cluster's QUIC keys from the shared certs volume (see docker-compose.yml).
RUN meridian-fix-uid postgres 999 999 \
 && groupadd --system --gid 10100 meridian-certs \
 && usermod -aG meridian-certs postgres \
 && install -d -o postgres -g postgres -m 0700 /var/lib/meridian /var/lib/meridian/pgdata \
 && install -d -o postgres -g postgres -m 2775 /var/run/postgresql
COPY .bin/meridian-agent /usr/local/bin/meridian-agent
ENV MERIDIAN_AGENT_DATA_DIR=/var/lib/meridian/pgdata \
    MERIDIAN_AGENT_PG_BIN_DIR=/usr/lib/postgresql/15/bin \
    MERIDIAN_AGENT_OS_USER=postgres \
    MERIDIAN_AGENT_PG_LISTEN=0.0.0.0 \
    MERIDIAN_AGENT_HTTP_LISTEN=0.0.0.0:8008
# postgres (numeric, for runAsNonRoot)
USER 999:999
VOLUME ["/var/lib/meridian"]
EXPOSE 5432 8008
HEALTHCHECK --interval=2s --timeout=3s --retries=3 --start-period=180s CMD ["meridian-healthcheck", "8008", "/health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "meridian-agent"]
