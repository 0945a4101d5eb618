#!/usr/bin/env bash
# rgw-up.sh DIR [PORT]
# Start (creating on first use) a throw-away single-host Ceph cluster -- 1 mon, 1 BlueStore OSD on a sparse
# file, no mgr, no cephx -- plus radosgw (beast) on 127.0.0.1:PORT, with all state under DIR.
# The real S3 server of the storage contract tests (tests/storage/conftest.py starts it once per session).
# Idempotent: daemons already running from DIR are left alone; a stopped cluster is restarted with its data.
# Needs (Debian 12, ceph 16.2): ceph-mon ceph-osd radosgw curl -- `./install.sh --dev` installs them.
# Env: S3_ACCESS_KEY, S3_SECRET_KEY (S3 user "test"), MON_PORT (default PORT+1, fixed at creation),
#      OSD_BYTES (sparse OSD file size, default 4 GiB, creation only), RGW_UP_TIMEOUT (s per step, default 120).
# Writes DIR/s3.env (S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY). Stop with rgw-down.sh DIR (also after a failure).
# Limits: DIR at most ~80 characters (unix sockets), no whitespace; keep PORT and MON_PORT outside 6800-7300
# (the OSD's port range). Adapted from the measured scripts of the shared tools folder (ceph 16.2.15).
set -euo pipefail
DIR=$(realpath -m "${1:?usage: rgw-up.sh DIR [PORT]}")
PORT=${2:-7480}
ACCESS=${S3_ACCESS_KEY:-TESTACCESSKEY0000001}
SECRET=${S3_SECRET_KEY:-testsecretkey00000000000000000000000001}
TMO=${RGW_UP_TIMEOUT:-120}
CONF=$DIR/ceph.conf
T0=$SECONDS
[[ "$DIR" != *[[:space:]]* ]] || { echo "rgw-up: DIR must not contain whitespace" >&2; exit 1; }
(( ${#DIR} <= 80 )) || { echo "rgw-up: DIR path too long for the daemons' unix sockets (max ~80 chars)" >&2; exit 1; }
[[ "$PORT" =~ ^[0-9]+$ ]] && (( PORT < 6800 || PORT > 7300 )) ||
  { echo "rgw-up: PORT '$PORT' must be a number outside 6800-7300 (the OSD's port range)" >&2; exit 1; }

for b in ceph ceph-mon ceph-osd radosgw radosgw-admin monmaptool uuidgen curl; do
  command -v "$b" > /dev/null || { echo "rgw-up: $b missing; run ./install.sh --dev (apt: ceph-mon ceph-osd radosgw curl)" >&2; exit 1; }
done
mkdir -p "$DIR"/{mon,osd,rgw,run,log}
[ -s "$DIR/fsid" ] || uuidgen > "$DIR/fsid"
[ -s "$DIR/mon_port" ] || echo "${MON_PORT:-$((PORT + 1))}" > "$DIR/mon_port"
FSID=$(cat "$DIR/fsid"); MONP=$(cat "$DIR/mon_port")

# Rewritten on every start (so PORT may change); fsid and mon port are fixed at creation.
cat > "$CONF" <<EOF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$MONP]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
# radosgw defaults ms_mon_client_mode to "secure", which auth=none cannot do (it retries -13 forever)
ms mon client mode = crc
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon data avail warn = 1
mon data avail crit = 0
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
run dir = $DIR/run
admin socket = $DIR/run/\$cluster-\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log

[mon]
mon data = $DIR/mon/\$cluster-\$id
# default 1 s: every osdmap change (osd boot, each pool create / application enable) waits for it
paxos propose interval = 0.1

[osd]
osd data = $DIR/osd/\$cluster-\$id
osd objectstore = bluestore
# no "bluestore block path": mkfs then creates the sparse file DIR/osd/ceph-0/block of this size
bluestore block size = ${OSD_BYTES:-4294967296}
osd op num shards = 1

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$PORT
rgw data = $DIR/rgw
EOF
C=(-c "$CONF")
declare -A CMD=(  # exact command lines (rgw-down.sh matches the same ones)
  [mon.a]="ceph-mon -c $CONF -i a -f"
  [osd.0]="ceph-osd -c $CONF -i 0 -f"
  [client.rgw.a]="radosgw -c $CONF -n client.rgw.a -f")

alive() {  # NAME: its pid file names a live (non-zombie) process running NAME's exact command line
  local pid st
  pid=$(cat "$DIR/run/$1.pid" 2> /dev/null) || return 1
  st=$(sed -E 's/.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2> /dev/null) && [ -n "$st" ] && [ "$st" != Z ] &&
    [ "$(tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null)" = "${CMD[$1]} " ]
}
start() {  # NAME: run it in the foreground (-f, logs in DIR/log) as a background child; record its pid
  # shellcheck disable=SC2086
  nohup ${CMD[$1]} >> "$DIR/log/$1.out" 2>&1 < /dev/null &
  echo $! > "$DIR/run/$1.pid"
}
wait_for() {  # NAME DESCRIPTION CMD...: poll CMD until it succeeds; fail if the daemon died, or on timeout
  local name=$1 desc=$2 end=$((SECONDS + TMO)); shift 2
  until "$@" > /dev/null 2>&1; do
    alive "$name" || { echo "rgw-up: $name died while waiting for $desc; see $DIR/log/$name.{log,out}" >&2; exit 1; }
    (( SECONDS < end )) || { echo "rgw-up: timeout waiting for $desc; see $DIR/log/" >&2; exit 1; }
    sleep 0.2
  done
  echo "rgw-up: $desc (t+$((SECONDS - T0))s)"
}
port_free() {  # PORT NAME: fail early if something else already listens there
  if (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; then
    echo "rgw-up: 127.0.0.1:$1 (for $2) is already in use by another process" >&2; exit 1
  fi
}
mon_ok() { timeout 10 ceph "${C[@]}" --connect-timeout 5 mon stat; }
osd_ok() { timeout 10 ceph "${C[@]}" --admin-daemon "$DIR/run/ceph-osd.0.asok" status | grep -q '"state": "active"'; }
rgw_ok() { curl -s "http://127.0.0.1:$PORT/" | grep -q ListAllMyBucketsResult; }

# --- mon
if [ ! -e "$DIR/mon/.mkfs-done" ]; then
  rm -rf "$DIR/mon/ceph-a" "$DIR/monmap"
  monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MONP]" "$DIR/monmap" > /dev/null
  ceph-mon "${C[@]}" --mkfs -i a --monmap "$DIR/monmap" > "$DIR/log/mon-mkfs.out" 2>&1
  touch "$DIR/mon/.mkfs-done"
fi
alive mon.a || { port_free "$MONP" mon.a; start mon.a; }
wait_for mon.a "mon.a in quorum" mon_ok

# --- osd
if [ ! -e "$DIR/osd/.mkfs-done" ]; then
  [ -s "$DIR/osd/uuid" ] || uuidgen > "$DIR/osd/uuid"
  id=$(timeout 30 ceph "${C[@]}" osd new "$(cat "$DIR/osd/uuid")")   # same uuid -> same id on a re-run
  [ "$id" = 0 ] || { echo "rgw-up: expected osd id 0, got '$id'" >&2; exit 1; }
  rm -rf "$DIR/osd/ceph-0"; mkdir -p "$DIR/osd/ceph-0"
  ceph-osd "${C[@]}" -i 0 --mkfs --osd-uuid "$(cat "$DIR/osd/uuid")" > "$DIR/log/osd-mkfs.out" 2>&1
  touch "$DIR/osd/.mkfs-done"
fi
alive osd.0 || start osd.0
wait_for osd.0 "osd.0 active" osd_ok

# --- rgw (creates its pools on first start)
alive client.rgw.a || { port_free "$PORT" radosgw; start client.rgw.a; }
wait_for client.rgw.a "radosgw answering on 127.0.0.1:$PORT" rgw_ok

# --- S3 user
if ! timeout 30 radosgw-admin "${C[@]}" user info --uid=test > "$DIR/user.json" 2> /dev/null; then
  timeout 30 radosgw-admin "${C[@]}" user create --uid=test --display-name="test user" \
    --access-key="$ACCESS" --secret-key="$SECRET" > "$DIR/user.json"
elif ! grep -qF "\"access_key\": \"$ACCESS\"" "$DIR/user.json"; then
  timeout 30 radosgw-admin "${C[@]}" key create --uid=test --key-type=s3 \
    --access-key="$ACCESS" --secret-key="$SECRET" > "$DIR/user.json"
fi
printf 'S3_ENDPOINT=127.0.0.1:%s\nS3_ACCESS_KEY=%s\nS3_SECRET_KEY=%s\n' "$PORT" "$ACCESS" "$SECRET" > "$DIR/s3.env"
echo "rgw-up: ready in $((SECONDS - T0))s: http://127.0.0.1:$PORT (env in $DIR/s3.env)"
