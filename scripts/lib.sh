# Shared bootstrap for scripts/demo and scripts/test (source it; bash, run as root).
#
#   ensure_system_packages   install the Debian 12 packages lazysnap, its tests and its
#                            benchmarks drive for real (only the missing ones)
#   ensure_venv              create .venv and `pip install -e .[test,bench]` (builds the C
#                            core); skipped when nothing it depends on changed
#
# Both are idempotent and quiet when there is nothing to do.

LAZYSNAP_APT_PACKAGES=(
  # daemons and tools the tests and the demo run for real
  containerd runc docker-registry umoci skopeo stargz-snapshotter fuse3 busybox-static
  debootstrap apache2-utils ca-certificates
  # the C core (ISA-L, zlib, zstd, libcrypto) and the C FUSE filesystem (libfuse 3)
  gcc make pkg-config libfuse3-dev libisal-dev libzstd-dev zlib1g-dev libssl-dev
  python3 python3-venv python3-dev
)

_lazysnap_log() { printf '%s\n' "$*" >&2; }

ensure_system_packages() {
  if [ "$(id -u)" -ne 0 ]; then
    _lazysnap_log "lazysnap: run as root (sudo): containerd, FUSE and mounts need it"
    return 1
  fi
  local missing=() pkg
  for pkg in "${LAZYSNAP_APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    _lazysnap_log "lazysnap: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # FUSE device and overlayfs must exist (modules may need loading on a fresh VM)
  [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
  if [ ! -e /dev/fuse ]; then
    _lazysnap_log "lazysnap: /dev/fuse is missing (load the fuse module)"
    return 1
  fi
}

# A stamp of everything the venv's contents depend on: the project metadata and the C core.
_lazysnap_venv_stamp() {
  cat pyproject.toml setup.py native/*.c native/*.h native/fuse/*.c native/fuse/*.h 2>/dev/null | sha256sum | cut -d" " -f1
}

ensure_venv() {
  local py="${LAZYSNAP_PYTHON:-python3}" stamp
  stamp="$(_lazysnap_venv_stamp)"
  if [ ! -x .venv/bin/python ]; then
    _lazysnap_log "lazysnap: creating .venv"
    "$py" -m venv .venv
  fi
  if [ "$(cat .venv/.lazysnap-stamp 2>/dev/null)" != "$stamp" ] \
      || ! .venv/bin/python -c 'import snapshotter._core, snapshotter._fuse' 2>/dev/null; then
    _lazysnap_log "lazysnap: installing the package into .venv (builds the C core; log .venv/install.log)"
    if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel \
           && .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench,ecr]'; } \
         > .venv/install.log 2>&1; then
      tail -n 20 .venv/install.log >&2
      _lazysnap_log "lazysnap: pip install failed (full log: .venv/install.log)"
      return 1
    fi
    echo "$stamp" > .venv/.lazysnap-stamp
  fi
}
