#!/usr/bin/env python3
"""Checks the object store of one of tests/chart.sh's Azure and GCS renders.

    check_object_store.py CASE RENDERED.yaml BERTH.toml

CASE is one of:
    azure    az:// with account and the account key from Secret berth-azure (access_key_file,
             mounted at /etc/berth/object-store), no S3 key id in the environment, egress to 443
             and not to the metadata server's port 80
    gcs      gs:// through Workload Identity: the url alone, egress to 443 and 80 (metadata)
    gcs-key  gs:// with an endpoint and the service account key from Secret berth-gcs
             (service_account_file), egress to the endpoint's port and not to 80
Exit status 1 (an assertion) when the render breaks one.
"""

import sys

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

DIR = "/etc/berth/object-store"
CASES = {
    "azure": {
        "store": {"url": "az://berth-cache/mirror", "account": "berthcache", "access_key_file": f"{DIR}/account-key"},
        "secret": ("berth-azure", [{"key": "account-key", "path": "account-key"}]),
        "ports": {443},
        "no_ports": {80},
    },
    "gcs": {
        "store": {"url": "gs://berth-cache/mirror"},
        "secret": None,
        "ports": {443, 80},
        "no_ports": set(),
    },
    "gcs-key": {
        "store": {"url": "gs://berth-cache/mirror", "endpoint": "http://fake-gcs.storage.svc:4443",
                  "service_account_file": f"{DIR}/service-account.json"},
        "secret": ("berth-gcs", [{"key": "service-account.json", "path": "service-account.json"}]),
        "ports": {4443},
        "no_ports": {80},
    },
}


def main(case, rendered, toml):
    want = CASES[case]
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    store = tomllib.load(open(toml, "rb"))["cache"]["object_store"]
    assert store == want["store"], store
    (wl,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    pod = wl["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert not any(e["name"] == "BERTH_S3_KEY_ID" for e in ctr.get("env", [])), "an S3 key id on a non-S3 store"
    vols = [v for v in pod["volumes"] if v["name"] == "object-store-credentials"]
    if want["secret"] is None:
        assert not vols, vols
    else:
        name, items = want["secret"]
        (vol,) = vols
        assert vol["secret"]["secretName"] == name and vol["secret"]["items"] == items, vol
        (mount,) = [m for m in ctr["volumeMounts"] if m["name"] == vol["name"]]
        assert mount["mountPath"] == DIR and mount["readOnly"] is True, mount
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    ports = {p["port"] for r in np["spec"]["egress"] for p in r["ports"]}
    assert want["ports"] <= ports and not (want["no_ports"] & ports), f"egress ports {ports}"
    print(f"{case}: [cache.object_store] {store}, egress to {sorted(want['ports'])}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in CASES:
        sys.exit(__doc__)
    main(*sys.argv[1:])
