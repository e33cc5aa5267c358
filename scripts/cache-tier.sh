#!/usr/bin/env bash
# An HTTP cache tier in front of an OCI registry: nginx proxy_cache with the slice module.
#
#   scripts/cache-tier.sh DIR LISTEN UPSTREAM [SLICE [MAX_SIZE]]
#     DIR       its config, cache, temp files and logs (created)
#     LISTEN    address:port to serve on, e.g. 10.0.1.1:5000
#     UPSTREAM  host:port of the registry (plain HTTP), e.g. 10.0.0.1:5000
#     SLICE     cache unit of blob bytes (default 1m)
#     MAX_SIZE  cache size bound (default 20g)
#
# Runs nginx in the foreground (the caller supervises it; SIGTERM stops it, SIGQUIT drains it).
# Clients list it as a mirror: with `capabilities = ["pull", "resolve"]` in hosts.toml it also
# answers manifests, so hosts can still resolve tags while the registry is down.
#
# What it caches (docs/fleet.md explains the choices):
# * blobs (/v2/NAME/blobs/sha256:...): in SLICE pieces, each fetched from the upstream once with a
#   Range request and kept for 30 days (a digest names fixed bytes). Any ranged GET is answered
#   (206) from the slices it covers, also on a cold cache; concurrent requests for the same slice
#   wait for one upstream fetch (proxy_cache_lock), so a rack costs the origin at most one copy of
#   each slice. Keyed by the digest alone: the same blob in two repositories is one copy.
# * manifests: 10 s fresh, then revalidated; a stale copy is served while the upstream errors or
#   is down (proxy_cache_use_stale), which is what lets a rack start images the cache holds.
# * everything else (/v2/ pings, tag lists, tokens): passed through, not cached.
# Authorization headers are passed upstream; cached blobs are served without asking the
# upstream again, so put a cache tier only where every client may read every cached blob.
# Redirects (a registry on S3 answering 307) are passed to the client, not cached.
set -euo pipefail

dir=${1:-}
listen=${2:-}
upstream=${3:-}
slice=${4:-1m}
max_size=${5:-20g}
[[ -n "$dir" && -n "$listen" && -n "$upstream" ]] || {
    echo "usage: $0 DIR LISTEN UPSTREAM [SLICE [MAX_SIZE]]" >&2
    exit 2
}
command -v nginx >/dev/null || { echo "$0: nginx is not installed (apt-get install nginx)" >&2; exit 1; }
nginx -V 2>&1 | grep -q -- --with-http_slice_module || { echo "$0: this nginx lacks the slice module" >&2; exit 1; }
mkdir -p "$dir"/{cache,tmp,client_tmp,fastcgi_tmp,uwsgi_tmp,scgi_tmp}
dir=$(cd "$dir" && pwd -P)
# nginx started as root runs its workers as another user, who must be able to write DIR: name it in
# CACHE_TIER_USER (e.g. www-data, owning DIR); by default the workers stay root, as DIR may sit in a
# private directory (a test's temporary one).
user_line=""
if [[ $EUID -eq 0 ]]; then
    user_line="user ${CACHE_TIER_USER:-root};"
fi

cat >"$dir/nginx.conf" <<EOF
$user_line
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    log_format cache '\$request_method \$uri \$status \$upstream_cache_status \$body_bytes_sent "\$http_range"';
    access_log $dir/access.log cache;
    client_body_temp_path $dir/client_tmp;
    proxy_temp_path $dir/tmp;
    fastcgi_temp_path $dir/fastcgi_tmp;
    uwsgi_temp_path $dir/uwsgi_tmp;
    scgi_temp_path $dir/scgi_tmp;
    proxy_cache_path $dir/cache levels=1:2 keys_zone=registry:32m max_size=$max_size inactive=30d use_temp_path=off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$http_host;
    proxy_buffering on;
    proxy_connect_timeout 5s;
    proxy_read_timeout 60s;
    upstream origin {
        server $upstream max_fails=0;
        keepalive 32;
    }
    server {
        listen $listen;
        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{64})\$" {
            set \$blob \$1;
            slice $slice;
            proxy_cache registry;
            proxy_cache_key "blob \$blob \$slice_range";
            proxy_set_header Range \$slice_range;
            proxy_cache_valid 200 206 30d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 600s;
            proxy_cache_lock_age 600s;
            proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
            proxy_pass http://origin;
        }
        location ~ ^/v2/.+/manifests/ {
            proxy_cache registry;
            proxy_cache_key "manifest \$uri \$http_accept";
            proxy_cache_valid 200 10s;
            proxy_cache_revalidate on;
            proxy_cache_lock on;
            proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
            proxy_cache_background_update on;
            proxy_pass http://origin;
        }
        location / {
            proxy_pass http://origin;
        }
    }
}
EOF
nginx -t -q -p "$dir" -c "$dir/nginx.conf"
exec nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;'
