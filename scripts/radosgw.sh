#!/usr/bin/env bash
# A throwaway single-node Ceph cluster with an S3 gateway (radosgw), for tests and benchmarks.
#
#   scripts/radosgw.sh start DIR [RGW_PORT [MON_PORT]]   # prints S3_ENDPOINT=, S3_ACCESS_KEY=, S3_SECRET_KEY=
#   scripts/radosgw.sh stop DIR                          # stops every daemon it started, removes DIR
#
# One monitor, one OSD and one radosgw, all on 127.0.0.1, cephx on, no manager (nothing here needs
# one: pools are created by the monitor, placement by the OSD). The OSD uses Ceph's memstore object
# store, so the data lives in the OSD's memory (capped at 1 GiB) and DIR holds only the monitor's
# store, keyrings and logs (a few MB); start takes about 15 s. Pools have one replica. Everything it
# starts writes a pid file under DIR/run, which `stop` uses (bounded waits, then SIGKILL).
# Needs: ceph-mon ceph-osd radosgw (Debian packages; scripts/setup.sh installs them).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: $0 start|stop DIR [RGW_PORT [MON_PORT]]" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop() {
    local f pid
    for f in "$dir"/run/*.pid; do
        [[ -f "$f" ]] || continue
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
    done
    for f in "$dir"/run/*.pid; do
        [[ -f "$f" ]] || continue
        pid=$(cat "$f")
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$f"
    done
}

case "$cmd" in
stop)
    [[ -d "$dir" ]] || exit 0
    stop
    rm -rf "$dir"
    exit 0
    ;;
start) ;;
*) echo "$0: unknown command $cmd" >&2; exit 2 ;;
esac

for tool in ceph-mon ceph-osd radosgw radosgw-admin ceph-authtool monmaptool ceph uuidgen; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is not installed (apt-get install ceph-mon ceph-osd radosgw)" >&2; exit 1; }
done
rgw_port=${3:-$(free_port)}
mon_port=${4:-$(free_port)}
dir=$(mkdir -p "$dir" && cd "$dir" && pwd -P)
mkdir -p "$dir/run" "$dir/log" "$dir/mon.a" "$dir/osd.0"
trap 'status=$?; if [[ $status -ne 0 ]]; then echo "$0: start failed; logs in $dir/log" >&2; tail -n 20 "$dir"/log/*.log >&2 2>/dev/null; stop; fi' EXIT

fsid=$(uuidgen)
conf="$dir/ceph.conf"
cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
ms bind msgr1 = false
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
mon data = $dir/mon.\$id
osd data = $dir/osd.\$id
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 1073741824
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
EOF

ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$dir/keyring" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' >/dev/null
ceph-authtool "$dir/keyring" --gen-key -n client.rgw.a --cap mon 'allow rw' --cap osd 'allow rwx' >/dev/null
monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
ceph-mon -c "$conf" -i a

osd_uuid=$(uuidgen)
timeout 60 ceph -c "$conf" osd new "$osd_uuid" >/dev/null
ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd-mkfs.out" 2>&1
ceph-osd -c "$conf" -i 0 2>>"$dir/log/osd-start.out"
for _ in $(seq 300); do
    timeout 10 ceph -c "$conf" osd stat 2>/dev/null | grep -q " 1 up" && break
    sleep 0.1
done
timeout 10 ceph -c "$conf" osd stat | grep -q " 1 up" || { echo "$0: the OSD did not come up" >&2; exit 1; }

radosgw -c "$conf" -n client.rgw.a 2>>"$dir/log/rgw-start.out"
for _ in $(seq 600); do
    curl -s -m 2 -o /dev/null "http://127.0.0.1:$rgw_port/" && break
    sleep 0.1
done
curl -sf -m 5 -o /dev/null "http://127.0.0.1:$rgw_port/" || { echo "$0: radosgw did not answer on port $rgw_port" >&2; exit 1; }

access=$(head -c 10 /dev/urandom | od -An -tx1 | tr -d ' \n')
secret=$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
timeout 60 radosgw-admin -c "$conf" user create --uid=lazyfs --display-name=lazyfs \
    --access-key="$access" --secret="$secret" >/dev/null
trap - EXIT
echo "S3_ENDPOINT=http://127.0.0.1:$rgw_port"
echo "S3_ACCESS_KEY=$access"
echo "S3_SECRET_KEY=$secret"
echo "CEPH_CONF=$conf"
