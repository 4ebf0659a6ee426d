#!/usr/bin/env bash
# Runs the node-config DaemonSet's script (from a rendered ConfigMap) against a scratch directory
# standing in for the node's /etc/containerd/certs.d, with /bin/sh, and checks that it:
#   - writes one hosts.toml per registry, pointing at berth's URL, with the upstream as `server`;
#   - leaves a hosts.toml it did not write alone (overwrite off);
#   - removes its own files, and only those, when it gets SIGTERM.
#
#   node_config_script.sh CONFIG_DIR
# CONFIG_DIR holds the ConfigMap's keys as files (check_render.py --dump-configmap). The marker is
# the first line of registry-0.toml (check_render.py checks it equals the DaemonSet's MARKER).
set -euo pipefail
config=$1
marker=$(head -n 1 "$config/registry-0.toml")
work=$(mktemp -d)
pid=""
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
certs=$work/certs.d
mkdir -p "$certs"
fail() { echo "node-config script: $*"; exit 1; }

[[ -s $config/configure.sh && -s $config/registries ]] || fail "configure.sh or registries missing in $config"
mapfile -t dirs < <(awk 'NF == 2 { print $2 }' "$config/registries")
((${#dirs[@]} >= 2)) || fail "expected at least two registries in the render, got ${#dirs[@]}"

# A file the chart did not write, for the second registry.
foreign="${dirs[1]}"
mkdir -p "$certs/$foreign"
printf 'server = "https://%s"\n# written by the node provisioning\n' "$foreign" >"$certs/$foreign/hosts.toml"
cp "$certs/$foreign/hosts.toml" "$work/foreign.orig"

url=http://10.96.0.50:5000   # only written into files; nothing connects to it
# shellcheck disable=SC2016 # SERVICE_HOST is what the kubelet leaves when the variable is unset
CERTS_DIR=$certs CONFIG_DIR=$config TARGET=clusterIP SCHEME=http ENDPOINT='' CLUSTER_IP=10.96.0.50 \
    SERVICE_DNS=unused. SERVICE_HOST='$(X_SERVICE_HOST)' SERVICE_PORT=5000 NODE_PORT='' HOST_IP='' \
    MARKER="$marker" OVERWRITE=false CLEANUP=true REFRESH_SECONDS=1 \
    PATH=${NODE_CONFIG_PATH:-$PATH} ${NODE_CONFIG_SHELL:-/bin/sh} "$config/configure.sh" >"$work/log" 2>&1 &
pid=$!

first="${dirs[0]}"
for _ in $(seq 50); do
    [[ -f $certs/$first/hosts.toml ]] && grep -q 'skipping' "$work/log" && break
    sleep 0.1
done
for d in "${dirs[@]}"; do
    [[ $d == "$foreign" ]] && continue
    f=$certs/$d/hosts.toml
    [[ -f $f ]] || { cat "$work/log"; fail "no hosts.toml for $d"; }
    grep -qxF "$marker" "$f" || fail "$f lacks the marker line"
    grep -qF "[host.\"$url\"]" "$f" || { cat "$f"; fail "$f does not point at $url"; }
    grep -qE '^server = "https://' "$f" || fail "$f has no https server line"
    grep -qF 'capabilities = ["pull", "resolve"]' "$f" || fail "$f lacks pull/resolve capabilities"
done
if [[ $first == docker.io ]]; then
    grep -qxF 'server = "https://registry-1.docker.io"' "$certs/docker.io/hosts.toml" ||
        fail "docker.io's server is not https://registry-1.docker.io"
fi
cmp -s "$certs/$foreign/hosts.toml" "$work/foreign.orig" || fail "the foreign $foreign/hosts.toml was changed"
grep -q "skipping $foreign" "$work/log" || { cat "$work/log"; fail "the skip of $foreign was not logged"; }
[[ -z $(find "$certs" -name '.hosts.toml.berth') ]] || fail "temporary files left behind"

kill -TERM "$pid"
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "the script did not exit on SIGTERM"
wait "$pid" || fail "the script exited non-zero on SIGTERM"
pid=""
for d in "${dirs[@]}"; do
    [[ $d == "$foreign" ]] && continue
    [[ ! -e $certs/$d/hosts.toml ]] || fail "$d/hosts.toml was not removed on exit"
done
cmp -s "$certs/$foreign/hosts.toml" "$work/foreign.orig" || fail "the foreign $foreign/hosts.toml was removed or changed on exit"
echo "node-config script: wrote ${#dirs[@]} registries' hosts.toml (one foreign file kept), removed them on SIGTERM"
