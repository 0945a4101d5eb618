#!/usr/bin/env bash
# Install the appliance on this machine (Debian 12, as root): system packages, the service user, the
# Python venv with pinned dependencies (llama-cpp-python built once into a wheelhouse) and the models.
# Safe to run again: it only does what is missing, and a second run takes a few seconds.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./install.sh [--dev] [--help]

Installs the appliance from this checkout on Debian 12 (run as root):
  - apt packages it needs (only the missing ones),
  - the system user `appliance` that Postgres, Redis and the API run as,
  - .venv (from /usr/bin/python3) with the dependencies pinned in constraints.txt;
    llama-cpp-python is compiled once into the wheelhouse (several minutes the first time),
  - the models of models/manifest.toml in models/gguf/, checked against their sha256,
  - traverse permission for `appliance` on the directories above this checkout.

Options:
  --dev     also install the test and lint tools (pytest, ruff, mypy) and Ceph
            (ceph-mon, ceph-osd, radosgw: the real S3 server of the storage tests)
  --help    show this help

Environment:
  APPLIANCE_WHEELHOUSE   wheel cache (default /var/cache/appliance/wheelhouse)
  APPLIANCE_MODEL_CACHE  built-model cache (default /var/cache/appliance/models)
EOF
}

die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

DEV=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dev) DEV=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown argument '$1' (see ./install.sh --help)" ;;
    esac
    shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cd "$REPO"

SERVICE_USER=appliance
SYSTEM_PYTHON=/usr/bin/python3
MIN_PYTHON=3.11
LLAMA_VERSION=0.3.36
WHEELHOUSE="${APPLIANCE_WHEELHOUSE:-/var/cache/appliance/wheelhouse}"
VENV="$REPO/.venv"
STAMP="$VENV/.install-stamp"
APT_PACKAGES=(python3 python3-venv python3-dev build-essential cmake git curl acl redis-server ca-certificates libmagic1 tesseract-ocr tesseract-ocr-eng)
# --dev: Ceph mon/osd/radosgw (+ curl, already above), the real S3 server the storage tests start on loopback.
((DEV)) && APT_PACKAGES+=(ceph-mon ceph-osd radosgw)

# Microseconds since the epoch (bash 5: no external tool needed).
now() { local t="${EPOCHREALTIME//[.,]/}"; echo "$t"; }
secs() { local us=$(($(now) - $1)); printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000)); }
T_ALL=$(now)
T_STEP=$T_ALL
step() { T_STEP=$(now); }
# done_step "what happened": one line with the step's duration.
done_step() { printf '  %-62s %6ss\n' "$1" "$(secs "$T_STEP")"; }

# --- Preflight --------------------------------------------------------------------------------------
[[ "$(uname -s)" == Linux ]] || die "this installer supports Linux (Debian 12) only, not $(uname -s)"
[[ -r /etc/os-release ]] || die "cannot read /etc/os-release: this installer supports Debian 12 only"
OS_ID="$(. /etc/os-release && echo "${ID:-}")"
OS_VERSION="$(. /etc/os-release && echo "${VERSION_ID:-}")"
[[ "$OS_ID" == debian && "$OS_VERSION" == 12 ]] ||
    die "this installer supports Debian 12 only (found ${OS_ID:-unknown} ${OS_VERSION:-unknown} in /etc/os-release)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this installer needs Debian's package manager"
[[ "$(id -u)" -eq 0 ]] || die "run as root (it installs packages and creates the '$SERVICE_USER' user): sudo ./install.sh"
python_ok() {
    "$SYSTEM_PYTHON" -c "import sys; sys.exit(0 if sys.version_info >= (${MIN_PYTHON/./, }) else 1)" 2>/dev/null
}
if [[ -x "$SYSTEM_PYTHON" ]] && ! python_ok; then
    die "$SYSTEM_PYTHON is $("$SYSTEM_PYTHON" -c 'import platform; print(platform.python_version())' 2>&1); Python >= $MIN_PYTHON is required"
fi

echo "Installing the appliance in $REPO"

# --- System packages --------------------------------------------------------------------------------
step
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "  installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
    done_step "apt: installed ${missing[*]}"
else
    done_step "apt: all ${#APT_PACKAGES[@]} packages present"
fi
python_ok || die "$SYSTEM_PYTHON is missing or older than $MIN_PYTHON after installing python3"

# The appliance runs its own private Redis as a child process: keep Debian's service off.
step
if command -v systemctl >/dev/null 2>&1 && [[ "$(systemctl is-enabled redis-server 2>/dev/null || true)" == enabled ]]; then
    systemctl disable redis-server >/dev/null 2>&1 || true
    systemctl stop redis-server >/dev/null 2>&1 || true
    done_step "redis: disabled Debian's redis-server service (the appliance runs its own)"
fi

# --- Service user -----------------------------------------------------------------------------------
step
if id -u "$SERVICE_USER" >/dev/null 2>&1; then
    done_step "user: '$SERVICE_USER' exists"
else
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER" ||
        die "useradd $SERVICE_USER failed"
    done_step "user: created system user '$SERVICE_USER'"
fi

# --- Python venv ------------------------------------------------------------------------------------
step
if [[ -x "$VENV/bin/python" ]]; then
    venv_home="$(sed -n 's/^home *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null || true)"
    [[ "$venv_home" == /usr/bin ]] ||
        die "$VENV was made from ${venv_home:-an unknown Python}, not $SYSTEM_PYTHON (the '$SERVICE_USER' user must run it): remove it and run ./install.sh again"
    done_step "venv: $VENV exists"
else
    "$SYSTEM_PYTHON" -m venv "$VENV" || die "python3 -m venv $VENV failed"
    if ! "$VENV/bin/pip" install --upgrade pip setuptools wheel >"$VENV/install-pip.log" 2>&1; then
        tail -n 20 "$VENV/install-pip.log" >&2
        die "upgrading pip, setuptools and wheel in $VENV failed (last lines above)"
    fi
    rm -f "$STAMP"
    done_step "venv: created $VENV (pip, setuptools, wheel upgraded)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# --- llama-cpp-python wheel -------------------------------------------------------------------------
step
mkdir -p "$WHEELHOUSE"
shopt -s nullglob
llama_wheels=("$WHEELHOUSE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl)
shopt -u nullglob
if ((${#llama_wheels[@]})); then
    done_step "wheelhouse: $(basename "${llama_wheels[0]}") present"
else
    echo "  building llama-cpp-python $LLAMA_VERSION from source into $WHEELHOUSE"
    echo "  (compiles llama.cpp: this takes several minutes, ~8 min on 2 cores; it happens once)"
    build_log="$VENV/build-llama-cpp-python.log"
    if ! CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "${PIP[@]}" wheel --verbose --no-deps --wheel-dir "$WHEELHOUSE" "llama-cpp-python==$LLAMA_VERSION" \
        >"$build_log" 2>&1; then
        tail -n 30 "$build_log" >&2
        die "building the llama-cpp-python $LLAMA_VERSION wheel failed (last lines above; full log: $build_log)"
    fi
    done_step "wheelhouse: built llama-cpp-python $LLAMA_VERSION"
fi

# --- Python dependencies ----------------------------------------------------------------------------
step
target="."
((DEV)) && target=".[dev]"
stamp_value="$(cat pyproject.toml constraints.txt <(echo "target=$target wheelhouse=$WHEELHOUSE") | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$stamp_value" && -x "$VENV/bin/appliance" ]]; then
    done_step "pip: dependencies up to date"
else
    pip_log="$VENV/install-pip.log"
    if ! "${PIP[@]}" install --find-links "$WHEELHOUSE" --only-binary llama-cpp-python \
        -c constraints.txt -e "$target" >"$pip_log" 2>&1; then
        tail -n 20 "$pip_log" >&2
        die "pip install -e '$target' failed (last lines above; full log: $pip_log)"
    fi
    echo "$stamp_value" >"$STAMP"
    done_step "pip: installed -e '$target' with constraints.txt"
fi

# --- Models -----------------------------------------------------------------------------------------
step
echo "  models:"
# On failure (e.g. a sha256 mismatch) the command itself prints the one line that says why.
APPLIANCE_WHEELHOUSE="$WHEELHOUSE" "$VENV/bin/appliance" models build --models-dir "$REPO/models" || exit 1
done_step "models: all present and verified"

# --- Traverse permission for the service user -------------------------------------------------------
step
changed=0
dir="$REPO"
dirs=()
while :; do
    dirs=("$dir" "${dirs[@]}")
    [[ "$dir" == / ]] && break
    dir="$(dirname "$dir")"
done
for d in "${dirs[@]}"; do
    if setpriv --reuid="$SERVICE_USER" --regid="$SERVICE_USER" --clear-groups -- test -x "$d" 2>/dev/null; then
        continue
    fi
    setfacl -m "u:$SERVICE_USER:--x" "$d" || die "setfacl on $d failed"
    echo "  granted '$SERVICE_USER' traverse (u:$SERVICE_USER:--x) on $d"
    changed=$((changed + 1))
done
if ((changed)); then
    done_step "permissions: $changed director$( ((changed == 1)) && echo y || echo ies) made traversable"
else
    done_step "permissions: '$SERVICE_USER' can reach $REPO"
fi

echo "Done in $(secs "$T_ALL")s. Next: .venv/bin/appliance up"
