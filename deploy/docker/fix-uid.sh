#!/bin/sh
# `fix-uid.sh USER UID GID`: gives a package-created system user a fixed numeric
# uid/gid (and moves its files along), so images can declare a numeric USER that
# Kubernetes' runAsNonRoot can check, whatever uid the package happened to get.
set -eu
user="$1"; uid="$2"; gid="$3"
old_uid="$(id -u "$user")"; old_gid="$(id -g "$user")"
group="$(id -gn "$user")"
if [ "$old_gid" != "$gid" ]; then
  groupmod -g "$gid" "$group"
  find / -xdev -group "$old_gid" -exec chgrp -h "$gid" {} + 2>/dev/null || true
fi
if [ "$old_uid" != "$uid" ]; then
  usermod -u "$uid" "$user"
  find / -xdev -user "$old_uid" -exec chown -h "$uid" {} + 2>/dev/null || true
fi
id "$user"
