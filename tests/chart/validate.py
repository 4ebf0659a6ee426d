#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests offline against the Kubernetes OpenAPI schemas.

    validate.py [-k VERSION]... RENDERED.yaml

Uses the schemas that ship in the `kubernetes-validate` package, in strict mode (unknown fields
are errors). Unlike the `kubernetes-validate` command, a kind without a schema is an error, except
for the prometheus-operator kinds (monitoring.coreos.com), which are custom resources with no
schema there: those are only checked for apiVersion/kind/metadata.name/spec and reported as
skipped. Exit status 0 when every document validates.
"""

import argparse
import sys

import yaml
from kubernetes_validate import utils

SKIPPED_GROUPS = ("monitoring.coreos.com/",)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", "--kubernetes-version", action="append", dest="versions")
    ap.add_argument("rendered")
    args = ap.parse_args()
    versions = args.versions or [utils.latest_version()]

    with open(args.rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if not docs:
        print(f"{args.rendered}: no Kubernetes objects rendered")
        return 1

    errors = 0
    validated = 0
    skipped = []
    for doc in docs:
        kind = doc.get("kind", "?")
        name = (doc.get("metadata") or {}).get("name", "?")
        what = f"{kind}/{name}"
        api = doc.get("apiVersion", "")
        if api.startswith(SKIPPED_GROUPS):
            if not isinstance(doc.get("spec"), dict) or name == "?":
                print(f"ERROR {what}: a {api} object needs metadata.name and a spec")
                errors += 1
            skipped.append(what)
            continue
        for version in versions:
            try:
                utils.validate(doc, version, strict=True)
                validated += 1
            except utils.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                print(f"ERROR {what} (Kubernetes {version}): {path}: {e.message}")
                errors += 1
            except utils.SchemaNotFoundError as e:
                print(f"ERROR {what}: {e.message}")
                errors += 1
    print(
        f"{args.rendered}: {len(docs)} objects, {validated} validations passed against Kubernetes "
        f"{', '.join(versions)}, {errors} errors"
    )
    if skipped:
        print(
            "  not schema-validated (prometheus-operator CRD kinds, no schema offline): "
            + ", ".join(skipped)
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
