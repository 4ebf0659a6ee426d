#!/usr/bin/env python3
"""Checks that every metric the Grafana dashboard and the alert rules query exists.

    metric_names.py DASHBOARD_JSON RULES_YAML METRICS_TXT [METRICS_TXT...]

DASHBOARD_JSON  a Grafana dashboard (charts/berth/dashboards/berth.json)
RULES_YAML      YAML holding PrometheusRule objects, e.g. `helm template` output with
                metrics.prometheusRule.enabled=true (other documents are ignored)
METRICS_TXT     Prometheus text exposition, e.g. `curl http://127.0.0.1:9090/metrics` of a running
                berth; a metric counts as present when it has a sample or a `# TYPE`/`# HELP` line
                (histogram and summary families also provide NAME_bucket, NAME_sum, NAME_count).
                With several files a metric must be present in at least one of them (e.g. the
                /metrics of an unclustered berth and of a clustered one with an object store, whose
                cluster and object-store series only such a berth has); every file must exist and
                hold at least one metric.

Metric names are taken from every PromQL expression (panel targets, template variable queries,
alert `expr`s): label matchers, ranges, strings, grouping label lists, function names and keywords
are removed, and what is left that looks like a metric name is one. Needs PyYAML. Exit status 1 when
a queried metric is missing, or when no expression was found at all.
"""

import json
import re
import sys

import yaml

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
KEYWORDS = {
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "inf", "nan", "atan2",
}


def names_in_promql(expr):
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)          # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)        # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-zA-Z$_]+", " ", s)
    out = set()
    for m in re.finditer(rf"(?<![\w.$:]){NAME}", s):
        name = m.group(0)
        rest = s[m.end():].lstrip()
        if rest.startswith("(") or name.lower() in KEYWORDS:
            continue
        out.add(name)
    return out


def names_in_variable_query(query):
    """Grafana template variable queries: label_values(metric, label), query_result(expr)."""
    m = re.match(rf"\s*label_values\(\s*({NAME})\s*(\{{[^}}]*\}})?\s*,", query)
    if m:
        return {m.group(1)}
    if re.match(r"\s*label_values\(", query):
        return set()  # label_values(label): no metric
    m = re.match(r"\s*query_result\((.*)\)\s*$", query, re.S)
    if m:
        return names_in_promql(m.group(1))
    if re.match(r"\s*(metrics|label_names)\(", query):
        return set()
    return names_in_promql(query)


def dashboard_exprs(dashboard):
    """(where, expr, is_variable_query) for every query in a dashboard, rows' panels included."""
    out = []

    def panels(items):
        for p in items or []:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} {t.get('refId', '')}", t["expr"], False))
            panels(p.get("panels"))

    panels(dashboard.get("panels"))
    for v in (dashboard.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if q:
            out.append((f"variable ${v.get('name')}", q, True))
    return out


def rule_exprs(rules_docs):
    out = []
    for d in rules_docs:
        if not d or d.get("kind") != "PrometheusRule":
            continue
        for g in d.get("spec", {}).get("groups", []):
            for r in g.get("rules", []):
                if "expr" in r:
                    what = r.get("alert") or r.get("record") or "?"
                    out.append((f"rule {what}", str(r["expr"]), False))
    return out


def exposed_names(text):
    names = set()
    for line in text.splitlines():
        m = re.match(rf"#\s*(TYPE|HELP)\s+({NAME})(?:\s+(\w+))?", line)
        if m:
            kind, name, typ = m.groups()
            names.add(name)
            if kind == "TYPE" and typ in ("histogram", "gaugehistogram"):
                names.update({name + "_bucket", name + "_sum", name + "_count"})
            if kind == "TYPE" and typ == "summary":
                names.update({name + "_sum", name + "_count"})
            continue
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(NAME, line)
        if m:
            names.add(m.group(0))
    return names


def main(argv):
    if len(argv) < 4:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        dashboard = json.load(f)
    with open(argv[2]) as f:
        rules_docs = list(yaml.safe_load_all(f))
    sources = argv[3:]
    exposed = set()
    for path in sources:
        try:
            with open(path) as f:
                names = exposed_names(f.read())
        except OSError as e:
            print(f"cannot read metrics file {path}: {e}")
            return 1
        if not names:
            print(f"no metrics in {path}")
            return 1
        exposed |= names
    checked = sources[0] if len(sources) == 1 else "every one of " + ", ".join(sources)

    queries = dashboard_exprs(dashboard)
    n_dash = len(queries)
    queries += rule_exprs(rules_docs)
    n_rules = len(queries) - n_dash
    if n_dash == 0 or n_rules == 0:
        print(f"found {n_dash} dashboard queries and {n_rules} alert rules: expected some of each")
        return 1

    used = {}
    for where, expr, is_var in queries:
        for name in names_in_variable_query(expr) if is_var else names_in_promql(expr):
            used.setdefault(name, []).append(where)
    missing = sorted(set(used) - exposed)
    for name in missing:
        print(f"missing from {checked}: {name} (queried by {', '.join(sorted(set(used[name])))})")
    print(
        f"{n_dash} dashboard queries and {n_rules} alert rules use {len(used)} metric names; "
        f"{len(used) - len(missing)} exposed, {len(missing)} missing"
    )
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
