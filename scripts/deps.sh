#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test resafe.
#   scripts/deps.sh          install missing system and Python packages
#   scripts/deps.sh --check  exit 0 when everything is present, 1 otherwise (installs nothing)
set -u
APT_PKGS="build-essential pkg-config libhdf5-dev hdf5-tools libcjson-dev libinih-dev clang libclang-rt-14-dev"
PY_MODS="torch transformers tokenizers safetensors sentencepiece google.protobuf h5py numpy pytest peft matplotlib"
PIP_PKGS="torch transformers tokenizers safetensors sentencepiece protobuf h5py numpy pytest peft matplotlib"
PY=${PYTHON:-python3}

missing_apt() {
  local m=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || m="$m $p"; done
  echo "$m"
}
missing_py() {
  "$PY" - $PY_MODS <<'PYEOF' 2>/dev/null || echo "python"
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m.split(".")[0]) is None
               or (m == "google.protobuf" and importlib.util.find_spec("google.protobuf") is None)))
PYEOF
}

if [ "${1:-}" = "--check" ]; then
  a=$(missing_apt); p=$(missing_py)
  [ -z "${a// }" ] && [ -z "${p// }" ] && exit 0
  echo "deps: missing:${a}${p:+ (python:) $p}" >&2
  exit 1
fi

a=$(missing_apt)
if [ -n "${a// }" ]; then
  echo "deps: installing Debian packages:$a"
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $a >/dev/null \
    || { echo "deps: apt-get install failed" >&2; exit 1; }
fi
p=$(missing_py)
if [ -n "${p// }" ]; then
  echo "deps: installing Python packages (torch is large: a few minutes)"
  "$PY" -m pip install -q --disable-pip-version-check $PIP_PKGS || { echo "deps: pip install failed" >&2; exit 1; }
fi
exit 0
