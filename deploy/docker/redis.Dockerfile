# Redis 7 from Debian's redis-server, as user redis; a cache, so no persistence.
FROM debian:bookworm-slim
COPY docker/apt-install.sh /usr/local/sbin/meridian-apt-install
RUN meridian-apt-install tini redis-server redis-tools
COPY docker/fix-uid.sh /usr/local/sbin/meridian-fix-uid
RUN meridian-fix-uid redis 997 997
# redis (numeric, for runAsNonRoot)
USER 997:997
WORKDIR /var/lib/redis
EXPOSE 6379
HEALTHCHECK --interval=2s --timeout=3s --retries=3 CMD ["redis-cli", "ping"]
ENTRYPOINT ["/usr/bin/tini", "--", "redis-server"]
CMD ["--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
