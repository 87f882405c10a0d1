# Shared bootstrap for scripts/demo and scripts/test (source it; bash, run as root).
#
#   ensure_system_packages   install the Debian 12 packages lazysnap, its tests and its
#                            benchmarks drive for real (only the missing ones)
#   ensure_venv              create .venv with exactly the packages of requirements/lock.txt
#                            (versions and hashes) and lazysnap itself (builds the C core);
#                            skipped when nothing it depends on changed
#
# Debian packages are Debian 12's: the stable release pins them. Python packages come
# from the lock only; `bash scripts/lock --upgrade` refreshes it.
#
# Both are idempotent and quiet when there is nothing to do.

LAZYSNAP_APT_PACKAGES=(
  # daemons and tools the tests and the demo run for real
  containerd runc docker-registry umoci skopeo stargz-snapshotter busybox-static
  debootstrap apache2-utils ca-certificates
  # the C core (ISA-L, zlib, zstd, libcrypto); the C FUSE filesystem needs only the
  # kernel's headers (linux-libc-dev, with gcc)
  gcc make pkg-config libisal-dev libzstd-dev zlib1g-dev libssl-dev
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

LAZYSNAP_LOCK="${LAZYSNAP_LOCK:-requirements/lock.txt}"
LAZYSNAP_VENV="${LAZYSNAP_VENV:-.venv}"

# What the venv's third-party packages depend on: the lock and the interpreter.
_lazysnap_deps_stamp() {
  { cat "$LAZYSNAP_LOCK"; "${LAZYSNAP_PYTHON:-python3}" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d" " -f1
}

# What the installed lazysnap depends on: the project metadata and the C core.
_lazysnap_project_stamp() {
  cat pyproject.toml setup.py native/*.c native/*.h native/fuse/*.c native/fuse/*.h 2>/dev/null | sha256sum | cut -d" " -f1
}

# One line for a lock pip could not install, naming the package: a version gone from
# PyPI, or a file whose hash is not the locked one.
_lazysnap_lock_failure() {
  local log="$1" what
  what="$(grep -oE 'No matching distribution found for [^ ]+' "$log" | head -n1 | sed 's/.* for //')"
  if [ -n "$what" ]; then
    printf 'lazysnap: the lock names %s, which PyPI does not serve; refresh it: bash scripts/lock --upgrade (log: %s)\n' "$what" "$log"
    return
  fi
  what="$(grep -A1 -E 'DO NOT MATCH THE HASHES' "$log" >/dev/null && grep -oE '^ +[A-Za-z0-9._-]+==[^ ]+ from ' "$log" | head -n1 | awk '{print $1}')"
  if [ -n "$what" ]; then
    printf 'lazysnap: %s does not match its hash in %s; refresh the lock: bash scripts/lock --upgrade (log: %s)\n' "$what" "$LAZYSNAP_LOCK" "$log"
    return
  fi
  printf 'lazysnap: installing %s failed: %s (log: %s; refresh the lock: bash scripts/lock --upgrade)\n' \
    "$LAZYSNAP_LOCK" "$(grep -E '^ERROR' "$log" | head -n1)" "$log"
}

# The venv holds exactly the locked packages (hash-checked) plus lazysnap itself, built
# against the locked setuptools. A changed lock or interpreter builds a new venv (nothing
# unlocked stays behind); a changed C core or pyproject.toml reinstalls lazysnap only. A
# failed install leaves no venv that looks ready: the stamps are written last.
ensure_venv() {
  local py="${LAZYSNAP_PYTHON:-python3}" venv="$LAZYSNAP_VENV" deps project log
  deps="$(_lazysnap_deps_stamp)"
  project="$(_lazysnap_project_stamp)"
  log="$venv.install.log"
  if [ "$(cat "$venv/.lazysnap-deps" 2>/dev/null)" != "$deps" ]; then
    _lazysnap_log "lazysnap: creating $venv from $LAZYSNAP_LOCK (log $log)"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
         -r "$LAZYSNAP_LOCK" > "$log" 2>&1; then
      _lazysnap_lock_failure "$log" >&2
      rm -rf "$venv"
      return 1
    fi
    echo "$deps" > "$venv/.lazysnap-deps"
  fi
  if [ "$(cat "$venv/.lazysnap-project" 2>/dev/null)" != "$project" ] \
      || ! "$venv/bin/python" -c 'import snapshotter._core, snapshotter._fuse' 2>/dev/null; then
    _lazysnap_log "lazysnap: installing the package into $venv (builds the C core; log $log)"
    rm -f "$venv/.lazysnap-project"
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
         -e . > "$log" 2>&1; then
      tail -n 20 "$log" >&2
      _lazysnap_log "lazysnap: building lazysnap failed (full log: $log)"
      return 1
    fi
    echo "$project" > "$venv/.lazysnap-project"
  fi
}
