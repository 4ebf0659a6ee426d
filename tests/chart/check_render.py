#!/usr/bin/env python3
"""Checks what the berth chart promises about a rendered release (`helm template` output).

    check_render.py RENDERED.yaml --toml-out FILE [EXPECTATIONS]
                                                     checks the render, writes berth.toml to FILE
    check_render.py RENDERED.yaml --dump-configmap NAME_SUFFIX DIR
                                                     writes each data key of that ConfigMap to DIR

Checks: exactly one berth.toml ConfigMap whose TOML parses and holds only keys berth knows;
no password or object-store key in any ConfigMap and no Secret rendered at all (credentials come
only from an existingSecret, mounted as a file that `password_file` or
`secret_access_key_file` names, or set as an environment variable from a secretKeyRef that
`access_key_id_env` names; the admin token and webhook headers likewise as files of Secret
volumes that `token_file` and `header_file` name, no secret header inline); [cluster] dns names a headless Service of the pods that lists only
ready pods, on the registry port; the berth container runs as
non-root 65532 with a read-only root filesystem, no privilege escalation, no capabilities and
the RuntimeDefault seccomp profile; probes /healthz and /readyz on the admin port; ports, mounts
and the config checksum annotation; a StatefulSet's headless Service; at most one hostPath
volume anywhere (the node-config DaemonSet's); ServiceMonitor and PodDisruptionBudget selectors.
Exit status 1 with one line per broken promise.

EXPECTATIONS, about one particular render:
    --expect-cluster-dns URL       [cluster] dns is URL
    --expect-no-cluster            no [cluster], and a Deployment has no headless Service
    --expect-object-store-secret NAME
                                   [cache.object_store] takes its credentials from Secret NAME:
                                   s3:// the access key id from env BERTH_S3_KEY_ID (secretKeyRef
                                   to NAME) and the secret access key from a file of NAME; az://
                                   the account key (access_key_file), gs:// the service account
                                   key (service_account_file) from a file of NAME
    --expect-object-store-no-keys  [cache.object_store] without key settings (the cloud's
                                   environment or workload identity)
    --expect-no-object-store       no [cache.object_store]
"""

import argparse
import os
import re
import sys

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

# Every key berth accepts (config/berth.toml; config.extraConfig may write any of them).
SERVER_KEYS = {
    "listen", "admin_listen", "shutdown_grace", "header_read_timeout", "tls",
    "max_connections_per_client", "client_requests_per_second", "client_burst",
}
TLS_KEYS = {"cert", "key", "client_ca"}
CACHE_KEYS = {"dir", "max_size", "tag_ttl", "negative_ttl", "max_idle", "pin", "platforms", "object_store"}
OBJECT_STORE_KEYS = {
    "url", "endpoint", "region", "access_key_id_env", "access_key_id_file",
    "secret_access_key_env", "secret_access_key_file", "account", "access_key_file",
    "service_account_file", "connect_timeout", "read_timeout",
}
OBJECT_STORE_CREDENTIALS = ("access_key_id", "secret_access_key")
# The keys of each service's credentials files (Azure's account key, GCS's service account key).
OBJECT_STORE_KEY_FILES = {"az": "access_key_file", "azure": "access_key_file", "gs": "service_account_file"}
# Keys that belong to one service only.
OBJECT_STORE_ONLY = {
    "s3": {"region", "access_key_id_env", "access_key_id_file", "secret_access_key_env", "secret_access_key_file"},
    "azure": {"account", "access_key_file"},
    "gs": {"service_account_file"},
}
CLUSTER_KEYS = {
    "peers", "dns", "probe_interval", "connect_timeout", "read_timeout", "server_name", "ca_file",
    "client_cert", "client_key",
}
LOG_KEYS = {"format"}
ADMIN_KEYS = {"token_file"}
HOSTED_KEYS = {"name", "repositories", "delete", "max_blob_size", "upload_ttl", "gc_grace"}
NOTIFY_KEYS = {"url", "events", "headers", "header_file", "timeout", "retries", "queue"}
# Headers that hold credentials: only from a header_file (a mounted Secret), never inline.
SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie"}
REGISTRY_KEYS = {
    "name", "default", "endpoints", "username", "password_file", "password_env",
    "connect_timeout", "read_timeout",
    # routing (rendered only when set in values)
    "balance", "fallback", "max_requests_per_second", "burst",
    # only from config.extraConfig
    "route", "probe_interval", "ratelimit_floor", "ratelimit_pause", "ca_file", "insecure",
}
PASSWORD_LINE = re.compile(r"(?i)\bpass(word)?\b\s*[=:]")
# An inline S3 key (`secret_access_key = ...`, `AWS_SECRET_ACCESS_KEY: ...`); the `_file` and
# `_env` keys do not match (no word boundary before the suffix).
S3_KEY_LINE = re.compile(r"(?i)\b(aws_)?(secret_access_key|access_key_id|secret_key|access_key)\b\s*[=:]")


class Checker:
    def __init__(self):
        self.problems = []

    def expect(self, cond, message):
        if not cond:
            self.problems.append(message)
        return cond


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def check(docs, toml_out, expect):
    c = Checker()
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)

    # --- berth.toml ------------------------------------------------------------------------------
    cms = [d for d in by_kind.get("ConfigMap", []) if "berth.toml" in (d.get("data") or {})]
    if not c.expect(len(cms) == 1, f"expected one ConfigMap with berth.toml, found {len(cms)}"):
        return c.problems
    config_cm = cms[0]
    text = config_cm["data"]["berth.toml"]
    with open(toml_out, "w") as f:
        f.write(text)
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        c.expect(False, f"berth.toml does not parse as TOML: {e}")
        return c.problems
    c.expect(set(cfg) <= {"server", "cache", "log", "registry", "cluster", "auth", "admin", "hosted", "notify"},
             f"unknown top-level keys: {sorted(set(cfg))}")
    admin = cfg.get("admin")
    if admin is not None:
        c.expect(set(admin) <= ADMIN_KEYS, f"unknown [admin] keys: {sorted(set(admin) - ADMIN_KEYS)}")
    for h in cfg.get("hosted", []):
        c.expect(set(h) <= HOSTED_KEYS, f"hosted {h.get('name')}: unknown keys {sorted(set(h) - HOSTED_KEYS)}")
    for n in cfg.get("notify", []):
        c.expect(set(n) <= NOTIFY_KEYS, f"notify {n.get('url')}: unknown keys {sorted(set(n) - NOTIFY_KEYS)}")
        inline = {k.lower() for k in n.get("headers", {})} & SECRET_HEADERS
        c.expect(not inline, f"notify {n.get('url')}: secret headers inline: {sorted(inline)}")
    server, cache = cfg.get("server", {}), cfg.get("cache", {})
    c.expect(set(server) <= SERVER_KEYS, f"unknown [server] keys: {sorted(set(server) - SERVER_KEYS)}")
    c.expect(set(server.get("tls", {})) <= TLS_KEYS, "unknown [server.tls] keys")
    c.expect(set(cache) <= CACHE_KEYS, f"unknown [cache] keys: {sorted(set(cache) - CACHE_KEYS)}")
    c.expect(set(cfg.get("log", {})) <= LOG_KEYS, "unknown [log] keys")
    store = cache.get("object_store")
    if store is not None:
        c.expect(set(store) <= OBJECT_STORE_KEYS, f"unknown [cache.object_store] keys: {sorted(set(store) - OBJECT_STORE_KEYS)}")
        scheme = str(store.get("url", "")).split("://", 1)[0]
        c.expect(scheme in ("s3", "az", "azure", "gs"), f"cache.object_store.url is not s3://, az:// or gs://: {store.get('url')}")
        family = "azure" if scheme == "az" else scheme
        for other, keys in OBJECT_STORE_ONLY.items():
            if other != family:
                c.expect(not (set(store) & keys), f"cache.object_store keys {sorted(set(store) & keys)} do not fit {scheme}://")
        for cred in OBJECT_STORE_CREDENTIALS:
            c.expect(cred not in store, f"cache.object_store.{cred} inline")
        has = [any(f"{cred}_{how}" in store for how in ("env", "file")) for cred in OBJECT_STORE_CREDENTIALS]
        c.expect(has[0] == has[1], "cache.object_store has only one of the access key id and the secret access key")
    cluster = cfg.get("cluster")
    if cluster is not None:
        c.expect(set(cluster) <= CLUSTER_KEYS, f"unknown [cluster] keys: {sorted(set(cluster) - CLUSTER_KEYS)}")
        c.expect(bool(cluster.get("peers")) != ("dns" in cluster), "[cluster] needs either peers or dns")
    registries = cfg.get("registry", [])
    c.expect(len(registries) >= 1, "berth.toml has no [[registry]]")
    for r in registries:
        extra = set(r) - REGISTRY_KEYS
        c.expect(not extra, f"registry {r.get('name')}: unknown keys {sorted(extra)}")
        c.expect("password" not in r, f"registry {r.get('name')}: an inline password")

    # --- no secrets in ConfigMaps, no Secrets rendered ---------------------------------------------
    for cm in by_kind.get("ConfigMap", []):
        for key, value in (cm.get("data") or {}).items():
            for line in str(value).splitlines():
                stripped = line.strip()
                if stripped.startswith("#"):
                    continue
                if PASSWORD_LINE.search(stripped) and "password_file" not in stripped and "password_env" not in stripped:
                    c.expect(False, f"ConfigMap {cm['metadata']['name']} key {key} holds a password: {stripped[:40]}...")
                if S3_KEY_LINE.search(stripped):
                    c.expect(False, f"ConfigMap {cm['metadata']['name']} key {key} holds an S3 key: {stripped[:40]}...")
    c.expect(not by_kind.get("Secret"), "the chart renders a Secret: credentials must come from existingSecret")

    # --- the berth workload ------------------------------------------------------------------------
    workloads = [d for d in by_kind.get("StatefulSet", []) + by_kind.get("Deployment", [])]
    if not c.expect(len(workloads) == 1, f"expected one StatefulSet or Deployment, found {len(workloads)}"):
        return c.problems
    wl = workloads[0]
    tmpl = wl["spec"]["template"]
    pod = tmpl["spec"]
    containers = [x for x in pod["containers"] if x["name"] == "berth"]
    if not c.expect(len(containers) == 1, "no container named berth"):
        return c.problems
    ctr = containers[0]
    psc, csc = pod.get("securityContext", {}), ctr.get("securityContext", {})

    def eff(key):
        return csc.get(key, psc.get(key))

    c.expect(eff("runAsNonRoot") is True, "runAsNonRoot is not true")
    c.expect(eff("runAsUser") == 65532, f"runAsUser is {eff('runAsUser')}, not 65532")
    c.expect(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem is not true")
    c.expect(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false")
    c.expect("ALL" in (csc.get("capabilities", {}).get("drop") or []), "capabilities do not drop ALL")
    c.expect((eff("seccompProfile") or {}).get("type") == "RuntimeDefault", "seccompProfile is not RuntimeDefault")
    c.expect(ctr.get("args", [])[-2:] == ["--config", "/etc/berth/berth.toml"], f"args: {ctr.get('args')}")

    ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
    c.expect(ports.get("registry") == port_of(server.get("listen", ":0")),
             f"registry containerPort {ports.get('registry')} != server.listen {server.get('listen')}")
    c.expect(ports.get("admin") == port_of(server.get("admin_listen", ":0")),
             f"admin containerPort {ports.get('admin')} != server.admin_listen {server.get('admin_listen')}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (ctr.get(probe) or {}).get("httpGet", {})
        c.expect(get.get("path") == path and get.get("port") in ("admin", ports.get("admin")),
                 f"{probe} is not GET {path} on the admin port: {get}")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in ctr.get("volumeMounts", [])}
    cfg_mount = mounts.get("/etc/berth/berth.toml")
    if c.expect(cfg_mount is not None, "berth.toml is not mounted at /etc/berth/berth.toml"):
        vol = volumes.get(cfg_mount["name"], {})
        c.expect(vol.get("configMap", {}).get("name") == config_cm["metadata"]["name"]
                 and cfg_mount.get("subPath") == "berth.toml",
                 "/etc/berth/berth.toml does not come from the berth.toml ConfigMap")
    tmp = mounts.get("/tmp")
    c.expect(tmp is not None and "emptyDir" in volumes.get(tmp["name"], {}), "/tmp is not an emptyDir")
    cache_mount = mounts.get(cache.get("dir"))
    if c.expect(cache_mount is not None, f"cache.dir {cache.get('dir')} is not mounted"):
        claims = [t["metadata"]["name"] for t in wl["spec"].get("volumeClaimTemplates", [])]
        c.expect(cache_mount["name"] in claims or cache_mount["name"] in volumes,
                 "the cache mount has no volume or claim template")
    c.expect("checksum/config" in (tmpl["metadata"].get("annotations") or {}),
             "the pod template has no checksum/config annotation")

    # Credentials: password_file must be a file of a Secret volume, mounted read-only.
    for r in registries:
        pf = r.get("password_file")
        if not pf:
            continue
        m = mounts.get(os.path.dirname(pf))
        if not c.expect(m is not None, f"registry {r['name']}: password_file {pf} is not in a mounted directory"):
            continue
        secret = volumes.get(m["name"], {}).get("secret")
        c.expect(secret is not None and m.get("readOnly") is True,
                 f"registry {r['name']}: {os.path.dirname(pf)} is not a read-only Secret volume")
        if secret:
            paths = [i["path"] for i in secret.get("items", [])]
            c.expect(os.path.basename(pf) in paths, f"registry {r['name']}: the Secret volume has no {os.path.basename(pf)}")
    # Object store keys: a *_file in a read-only Secret volume, an *_env from a secretKeyRef.
    env = {e["name"]: e for e in ctr.get("env", [])}
    for e in env.values():
        c.expect(not (S3_KEY_LINE.search(e["name"] + ":") and "value" in e),
                 f"env {e['name']} holds an S3 key as a plain value")
    # S3's key files, Azure's account key, GCS's service account key.
    file_keys = [f"{cred}_file" for cred in OBJECT_STORE_CREDENTIALS] + sorted(set(OBJECT_STORE_KEY_FILES.values()))
    for key in file_keys if store else ():
        f = store.get(key)
        if f:
            m = mounts.get(os.path.dirname(f))
            secret = volumes.get(m["name"], {}).get("secret") if m else None
            if c.expect(secret is not None and m.get("readOnly") is True,
                        f"cache.object_store.{key} {f}: not in a read-only Secret volume"):
                c.expect(os.path.basename(f) in [i["path"] for i in secret.get("items", [])],
                         f"cache.object_store.{key}: the Secret volume has no {os.path.basename(f)}")
    for cred in OBJECT_STORE_CREDENTIALS if store else ():
        var = store.get(f"{cred}_env")
        if var:
            ref = (env.get(var) or {}).get("valueFrom", {}).get("secretKeyRef")
            c.expect(ref is not None and ref.get("name") and ref.get("key"),
                     f"cache.object_store.{cred}_env: env {var} does not come from a secretKeyRef")
    # The admin token and webhook headers: files of read-only Secret volumes.
    secret_files = [("admin.token_file", (admin or {}).get("token_file"))]
    secret_files += [(f"notify[{i}].header_file", n.get("header_file")) for i, n in enumerate(cfg.get("notify", []))]
    for key, f in secret_files:
        if not f:
            continue
        m = mounts.get(os.path.dirname(f))
        secret = volumes.get(m["name"], {}).get("secret") if m else None
        if c.expect(secret is not None and m.get("readOnly") is True, f"{key} {f}: not in a read-only Secret volume"):
            c.expect(os.path.basename(f) in [i["path"] for i in secret.get("items", [])],
                     f"{key}: the Secret volume has no {os.path.basename(f)}")
    tls = server.get("tls")
    if tls:
        for key in ("cert", "key"):
            m = mounts.get(os.path.dirname(tls.get(key, "")))
            c.expect(m is not None and "secret" in volumes.get(m["name"], {}),
                     f"server.tls.{key} {tls.get(key)} is not in a mounted Secret")

    # --- Services ----------------------------------------------------------------------------------
    labels = tmpl["metadata"].get("labels", {})

    def selects(sel):
        return bool(sel) and all(labels.get(k) == v for k, v in sel.items())

    services = [s for s in by_kind.get("Service", []) if selects(s["spec"].get("selector"))]
    main = [s for s in services if s["spec"].get("clusterIP") != "None"]
    if c.expect(len(main) == 1, f"expected one Service selecting the berth pods, found {len(main)}"):
        sp = {p["name"]: p.get("targetPort") for p in main[0]["spec"]["ports"]}
        c.expect(sp.get("registry") in ("registry", ports.get("registry")), "the Service has no registry port")
        c.expect(sp.get("metrics") in ("admin", ports.get("admin")), "the Service has no metrics port to the admin port")
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    if wl["kind"] == "StatefulSet":
        c.expect(any(s["metadata"]["name"] == wl["spec"].get("serviceName") for s in headless),
                 "the StatefulSet's serviceName is not a headless Service of its pods")
    if cluster and cluster.get("dns"):
        # dns: SCHEME://SERVICE.NAMESPACE.svc.DOMAIN:PORT, a headless Service listing ready pods.
        m = re.fullmatch(r"(https?)://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.([a-z0-9.-]+):([0-9]+)/?", cluster["dns"])
        if c.expect(m is not None, f"cluster.dns {cluster['dns']} is not http(s)://SERVICE.NAMESPACE.svc.DOMAIN:PORT"):
            scheme, svc, ns, _domain, port = m.groups()
            c.expect(scheme == ("https" if server.get("tls") else "http"),
                     f"cluster.dns scheme {scheme} does not match the registry listener's TLS")
            c.expect(int(port) == ports.get("registry"),
                     f"cluster.dns port {port} is not the registry containerPort {ports.get('registry')}")
            c.expect(ns == wl["metadata"].get("namespace"), f"cluster.dns namespace {ns} is not the workload's")
            named = [s for s in headless if s["metadata"]["name"] == svc and s["metadata"].get("namespace") == ns]
            if c.expect(len(named) == 1, f"cluster.dns names {svc}.{ns}, which is not a headless Service of the pods"):
                c.expect(named[0]["spec"].get("publishNotReadyAddresses", False) is False,
                         f"headless Service {svc} publishes not-ready pods as peers")
    for sm in by_kind.get("ServiceMonitor", []):
        c.expect(selects(sm["spec"]["selector"].get("matchLabels")) and
                 any(e.get("port") == "metrics" for e in sm["spec"].get("endpoints", [])),
                 "the ServiceMonitor does not select the berth Service's metrics port")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        c.expect(selects(pdb["spec"]["selector"].get("matchLabels")), "the PodDisruptionBudget does not select the pods")

    # --- expectations of this render ----------------------------------------------------------------
    if expect.cluster_dns is not None:
        c.expect((cluster or {}).get("dns") == expect.cluster_dns,
                 f"cluster.dns is {(cluster or {}).get('dns')!r}, expected {expect.cluster_dns!r}")
    if expect.no_cluster:
        c.expect(cluster is None, "berth.toml has a [cluster]")
        if wl["kind"] == "Deployment":
            c.expect(not headless, "a Deployment without a cluster has a headless Service")
    if expect.no_object_store:
        c.expect(store is None, "berth.toml has a [cache.object_store]")
    if expect.object_store_no_keys:
        if c.expect(store is not None, "berth.toml has no [cache.object_store]"):
            keys = [k for k in store if k.startswith(OBJECT_STORE_CREDENTIALS) or k in OBJECT_STORE_KEY_FILES.values()]
            c.expect(not keys, f"[cache.object_store] has key settings {keys}")
        c.expect("BERTH_S3_KEY_ID" not in env, "env BERTH_S3_KEY_ID without objectStore.existingSecret")
    if expect.object_store_secret is not None and c.expect(store is not None, "berth.toml has no [cache.object_store]"):
        name = expect.object_store_secret
        scheme = str(store.get("url", "")).split("://", 1)[0]
        if scheme in OBJECT_STORE_KEY_FILES:
            f = store.get(OBJECT_STORE_KEY_FILES[scheme])
            if c.expect(f is not None, f"cache.object_store has no {OBJECT_STORE_KEY_FILES[scheme]}: {store}"):
                m = mounts.get(os.path.dirname(f)) or {}
                secret = volumes.get(m.get("name"), {}).get("secret") or {}
                c.expect(secret.get("secretName") == name, f"{f} is not mounted from Secret {name}")
            c.expect("BERTH_S3_KEY_ID" not in env, f"env BERTH_S3_KEY_ID on a {scheme}:// store")
    if expect.object_store_secret is not None and store is not None and str(store.get("url", "")).startswith("s3://"):
        name = expect.object_store_secret
        c.expect(store.get("access_key_id_env") == "BERTH_S3_KEY_ID" and "access_key_id_file" not in store,
                 f"cache.object_store access key id is not access_key_id_env = BERTH_S3_KEY_ID: {store}")
        ref = (env.get("BERTH_S3_KEY_ID") or {}).get("valueFrom", {}).get("secretKeyRef") or {}
        c.expect(ref.get("name") == name, f"env BERTH_S3_KEY_ID is not from Secret {name}: {ref}")
        f = store.get("secret_access_key_file")
        if c.expect(f is not None and "secret_access_key_env" not in store,
                    "cache.object_store secret access key is not a secret_access_key_file"):
            m = mounts.get(os.path.dirname(f)) or {}
            secret = volumes.get(m.get("name"), {}).get("secret") or {}
            c.expect(secret.get("secretName") == name, f"{f} is not mounted from Secret {name}")

    # --- hostPath: only the node-config DaemonSet, only one -----------------------------------------
    for d in docs:
        spec = d.get("spec", {})
        podspec = spec.get("template", {}).get("spec") if isinstance(spec, dict) else None
        if not podspec:
            continue
        hostpaths = [v["hostPath"]["path"] for v in podspec.get("volumes", []) if "hostPath" in v]
        if d["kind"] == "DaemonSet":
            c.expect(len(hostpaths) == 1, f"DaemonSet {d['metadata']['name']} mounts {len(hostpaths)} hostPaths")
            if hostpaths:
                print(f"  node-config DaemonSet writes into hostPath {hostpaths[0]}")
            check_node_config(c, d, by_kind.get("ConfigMap", []))
        else:
            c.expect(not hostpaths, f"{d['kind']} {d['metadata']['name']} mounts a hostPath")
    return c.problems


def check_node_config(c, ds, configmaps):
    """The DaemonSet's script ConfigMap: a hosts.toml per listed registry, each starting with the
    marker the DaemonSet's script looks for."""
    podspec = ds["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in podspec["containers"][0].get("env", [])}
    cm_names = [v["configMap"]["name"] for v in podspec.get("volumes", []) if "configMap" in v]
    cms = [cm for cm in configmaps if cm["metadata"]["name"] in cm_names]
    if not c.expect(len(cms) == 1, "the node-config DaemonSet mounts no ConfigMap of the render"):
        return
    data = cms[0].get("data", {})
    listed = [line.split() for line in data.get("registries", "").splitlines() if line.strip()]
    c.expect(listed and all(len(x) == 2 and x[0] in data for x in listed),
             "the node-config registries list names missing hosts.toml keys")
    for key, _dir in listed:
        toml_text = data.get(key, "")
        c.expect(toml_text.splitlines()[:1] == [env.get("MARKER")],
                 f"node-config {key} does not start with the DaemonSet's MARKER")
        try:
            parsed = tomllib.loads(toml_text.replace("@BERTH_URL@", "http://192.0.2.1:5000"))
            c.expect(parsed.get("server", "").startswith("http") and "http://192.0.2.1:5000" in parsed.get("host", {}),
                     f"node-config {key} lacks server or the berth host")
        except tomllib.TOMLDecodeError as e:
            c.expect(False, f"node-config {key} is not TOML: {e}")


def dump_configmap(docs, suffix, outdir):
    cms = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"].endswith(suffix)]
    if len(cms) != 1:
        print(f"expected one ConfigMap named *{suffix}, found {len(cms)}")
        return 1
    os.makedirs(outdir, exist_ok=True)
    for key, value in cms[0].get("data", {}).items():
        with open(os.path.join(outdir, key), "w") as f:
            f.write(value)
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--toml-out")
    ap.add_argument("--dump-configmap", nargs=2, metavar=("NAME_SUFFIX", "DIR"))
    ap.add_argument("--expect-cluster-dns", dest="cluster_dns", metavar="URL")
    ap.add_argument("--expect-no-cluster", dest="no_cluster", action="store_true")
    ap.add_argument("--expect-object-store-secret", dest="object_store_secret", metavar="NAME")
    ap.add_argument("--expect-object-store-no-keys", dest="object_store_no_keys", action="store_true")
    ap.add_argument("--expect-no-object-store", dest="no_object_store", action="store_true")
    args = ap.parse_args()
    docs = load(args.rendered)
    if args.dump_configmap:
        return dump_configmap(docs, *args.dump_configmap)
    if not args.toml_out:
        ap.error("--toml-out or --dump-configmap is required")
    problems = check(docs, args.toml_out, args)
    for p in problems:
        print(f"  {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
