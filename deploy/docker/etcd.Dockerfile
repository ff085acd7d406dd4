# etcd 3.4 from Debian's etcd-server (etcdctl from etcd-client for health checks), as user etcd.
FROM debian:bookworm-slim
COPY docker/apt-install.sh /usr/local/sbin/meridian-apt-install
RUN meridian-apt-install ca-certificates tini etcd-server etcd-client
COPY docker/fix-uid.sh /usr/local/sbin/meridian-fix-uid
RUN meridian-fix-uid etcd 998 998 && install -d -o etcd -g etcd -m 0700 /var/lib/etcd/data
ENV ETCD_DATA_DIR=/var/lib/etcd/data \
    ETCDCTL_API=3
# etcd (numeric, for runAsNonRoot)
USER 998:998
VOLUME ["/var/lib/etcd"]
EXPOSE 2379 2380
HEALTHCHECK --interval=2s --timeout=3s --retries=5 --start-period=30s CMD ["etcdctl", "--endpoints=http://127.0.0.1:2379", "--command-timeout=2s", "endpoint", "health"]
ENTRYPOINT ["/usr/bin/tini", "--", "etcd"]
