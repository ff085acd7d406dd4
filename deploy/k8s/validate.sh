#!/usr/bin/env bash
# Validates the Kubernetes manifests in this directory against the Kubernetes
# OpenAPI schemas, offline: kubernetes-validate (PyPI) bundles the schemas of
# every Kubernetes release in its package, so no cluster and no schema download
# is needed. It is installed once into a private virtualenv.
#
# Usage: deploy/k8s/validate.sh [-k KUBERNETES_VERSION]   (default 1.31.0)
# Env:   MERIDIAN_VALIDATE_VENV  where the virtualenv lives [~/.cache/meridian/k8s-validate]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="1.31.0"
if [ "${1:-}" = "-k" ]; then K8S_VERSION="$2"; fi
VENV="${MERIDIAN_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/meridian/k8s-validate}"
PIN="kubernetes-validate==1.37.0"

if ! "$VENV/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  echo "validate: installing $PIN into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$PIN"
fi

# Every manifest except the kustomization (not a Kubernetes resource).
mapfile -t FILES < <(find "$HERE" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)
echo "validate: ${#FILES[@]} files against Kubernetes $K8S_VERSION (strict)" >&2
"$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${FILES[@]}"
