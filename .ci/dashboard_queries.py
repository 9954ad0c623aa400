#!/usr/bin/env python3
"""Evaluates dashboard queries against a real Prometheus; each must return series.

Usage:
  dashboard_queries.py --prometheus URL [--var NAME=VALUE ...] SOURCE...

A SOURCE is a Grafana dashboard (*.json: every panel's targets[].expr,
rows' nested panels included, and the query of every query-type template
variable) or a text file of PromQL, one query a line ('#' starts a
comment). Template variables ($name, ${name}, ${name:regex}) are replaced
by --var values (default '.+' for any variable not given, so a `=~"$gpu"`
matcher means "All"); Grafana's $__rate_interval, $__interval and $__range
by the values of the options below. `label_values(METRIC, LABEL)` (a
variable's query) is evaluated as `count by (LABEL) (METRIC)`.

Exit status 1 names every query that failed or returned no series; the
queries that did return series are listed with their series count.
Standard library only.
"""
import argparse
import json
import re
import sys
import urllib.parse
import urllib.request


def dashboard_queries(path):
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    out = []
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if q:
                out.append((f"variable {v['name']}", q))

    ids = set()

    def walk(panels):
        for p in panels:
            where = f"panel {p.get('title', p.get('id'))!r}"
            if p.get("id") in ids:
                out.append((f"{where}: duplicate panel id {p.get('id')}", None))
            ids.add(p.get("id"))
            exprs = [t for t in p.get("targets", []) if t.get("expr")]
            if p.get("type") != "row" and not exprs:
                out.append((f"{where}: a panel without a query", None))
            for t in exprs:
                out.append((f"{where} {t.get('refId', '')}", t["expr"]))
            walk(p.get("panels", []))

    walk(d.get("panels", []))
    return out


def text_queries(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((f"line {n}", line))
    return out


VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\s*\)$", re.S)


def substitute(expr, variables, builtins):
    def repl(m):
        name = m.group(1) or m.group(2)
        if name in builtins:
            return builtins[name]
        return variables.get(name, ".+")

    expr = VAR.sub(repl, expr)
    m = LABEL_VALUES.match(expr.strip())
    if m:
        expr = f"count by ({m.group(2)}) ({m.group(1)})"
    return expr


def query(base, expr):
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    except OSError as e:
        return None, str(e)
    if body.get("status") != "success":
        return None, body.get("error", "query failed")
    return len(body["data"]["result"]), None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", required=True, help="Prometheus base URL")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--rate-interval", default="15s")
    p.add_argument("--interval", default="5s")
    p.add_argument("--range", default="5m")
    p.add_argument("sources", nargs="+")
    a = p.parse_args()
    variables = dict(v.split("=", 1) for v in a.var)
    builtins = {
        "__rate_interval": a.rate_interval,
        "__interval": a.interval,
        "__range": a.range,
        "datasource": "",
    }
    failed = 0
    total = 0
    for source in a.sources:
        queries = dashboard_queries(source) if source.endswith(".json") else text_queries(source)
        if not queries:
            print(f"{source}: no queries found", file=sys.stderr)
            failed += 1
        for where, expr in queries:
            total += 1
            if expr is None:
                failed += 1
                print(f"FAIL {source} {where}", file=sys.stderr)
                continue
            concrete = substitute(expr, variables, builtins)
            n, err = query(a.prometheus, concrete)
            if err or not n:
                failed += 1
                why = err or "no series"
                print(f"FAIL {source} {where}: {why}\n     {concrete}", file=sys.stderr)
            else:
                print(f"ok   {source} {where}: {n} series  {concrete}")
    print(f"{total - failed} of {total} queries returned series", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
