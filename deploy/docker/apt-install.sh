#!/bin/sh
# Installs the given Debian packages unless they are all installed already (the
# offline base image from deploy/bootstrap-base-image.sh carries them, so image
# builds need no network there). As the official postgres images do, no default
# PostgreSQL cluster is created: the agent runs initdb itself.
set -eu
missing=""
for p in "$@"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing="$missing $p"
  fi
done
if [ -z "$missing" ]; then
  echo "apt-install: already installed: $*"
  exit 0
fi
echo "apt-install: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update
case " $missing " in
  *" postgresql-"*)
    apt-get install -y --no-install-recommends postgresql-common
    sed -ri 's/^#?(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf
    ;;
esac
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $missing
apt-get clean
rm -rf /var/lib/apt/lists/*
