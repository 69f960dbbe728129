"""dashboards/omniray.json against cluster/metrics.py: every query names only
metrics OmniRay exports, under the names Prometheus stores them as, and every
exported metric is on the dashboard.

How Ray 2.60 names what `ray.util.metrics` records (read from the installed ray):

* `ray/_private/telemetry/open_telemetry_metric_recorder.py` (the default path,
  `RAY_enable_open_telemetry` on) registers every instrument as
  `f"{NAMESPACE}_{name}"` with `NAMESPACE = "ray"` and unit "1", and the
  opentelemetry Prometheus exporter maps unit "1" to no suffix: `omniray_x`
  is scraped as `ray_omniray_x`.
* A Counter arrives as a monotonic OTel Sum and goes out through prometheus_client's
  `CounterMetricFamily`, which strips a trailing `_total` from the family name and
  writes the sample as `<family>_total`. So `omniray_requests_total` is scraped as
  `ray_omniray_requests_total` (not `..._total_total`); a counter named without
  `_total` would be scraped as `ray_<name>_total`. The legacy OpenCensus path
  (`_private/metrics_agent.py`, `RAY_enable_open_telemetry=0`) gives the same name
  and, because the name already ends in `_total`, no deprecated gauge twin
  (`RAY_EXPORT_COUNTER_AS_GAUGE`) either.
* A Histogram is scraped as `ray_<name>_bucket` (with `le`), `_sum` and `_count`;
  a Gauge as `ray_<name>`.
* Labels: the metric's tags plus Ray's global tags (`SessionName`, `WorkerId`,
  `Component`, ...). Prometheus keeps `instance` (and `job`) for the scrape target and,
  with the default `honor_labels: false` (Ray's generated prometheus.yml and a
  KubeRay PodMonitor both leave it so), renames a scraped `instance` label to
  `exported_instance`: OmniRay's `instance` tag is queried as `exported_instance`.

Checked by feeding the installed opentelemetry-exporter-prometheus (0.66b2) and
prometheus_client (0.26) the instruments Ray would register: it printed
`ray_omniray_requests_total{...}`, `ray_omniray_foo_total` for a counter `omniray_foo`,
`ray_omniray_ttft_seconds_bucket/_sum/_count` and an unrenamed `instance` label.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "omniray.json"
METRICS_PY = ROOT / "cluster" / "metrics.py"
README = ROOT / "dashboards" / "README.md"

RAY_PREFIX = "ray_"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
KINDS = {"Histogram": "histogram", "Counter": "counter", "Gauge": "gauge"}
# tag_keys' position when passed positionally: Histogram(name, description, boundaries, tag_keys)
TAG_KEYS_ARG = {"Histogram": 3, "Counter": 2, "Gauge": 2}
# Prometheus target labels a scraped tag gets renamed away from (honor_labels: false)
RENAMED = {"instance": "exported_instance", "job": "exported_job"}
# labels every panel may filter on: Ray's session tag and KubeRay's cluster label
GLOBAL_FILTER_LABELS = {"SessionName", "ray_io_cluster"}
METRIC_RE = re.compile(r"\bray_omniray_[a-z0-9_]+")


# --- what cluster/metrics.py exports -------------------------------------------------


def table_metrics(doc: str | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (kind, tags) from a `| metric | kind | tags | ...` markdown table, by default
    the docstring table of cluster/metrics.py."""
    if doc is None:
        doc = ast.get_docstring(ast.parse(METRICS_PY.read_text()))
    out = {}
    for line in doc.splitlines():
        if not line.strip().startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not cells[0].startswith("omniray_"):
            continue
        name, kind, tags = cells[0], cells[1], cells[2]
        assert name not in out, f"{name} twice in the table"
        out[name] = (kind, tuple(t.strip() for t in tags.split(",") if t.strip()))
    return out


def _str(node: ast.AST, env: dict) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif (isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name)
                  and v.value.id in env and v.format_spec is None):
                parts.append(str(env[v.value.id]))
            else:
                return None
        return "".join(parts)
    return None


def _strs(node: ast.AST | None, env: dict) -> tuple[str, ...] | None:
    """A tuple of str constants, possibly built from local tuples (`(*tags, "gap")`)."""
    if node is None:
        return ()
    if isinstance(node, ast.Name):
        value = env.get(node.id)
        return value if isinstance(value, tuple) else None
    if isinstance(node, (ast.Tuple, ast.List)):
        out: list[str] = []
        for elt in node.elts:
            if isinstance(elt, ast.Starred):
                inner = _strs(elt.value, env)
                if inner is None:
                    return None
                out.extend(inner)
            elif (s := _str(elt, env)) is not None:
                out.append(s)
            else:
                return None
        return tuple(out)
    return None


def _literal(node: ast.AST):
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return None
    return value if isinstance(value, (tuple, list, set)) else None


def _bind(helper: ast.FunctionDef, call: ast.Call) -> dict[str, ast.AST]:
    """parameter -> argument node of a call to a local helper, defaults filled in."""
    params = [a.arg for a in helper.args.args]
    bound = dict(zip(params[len(params) - len(helper.args.defaults):], helper.args.defaults))
    bound.update(zip(params, call.args))
    bound.update({k.arg: k.value for k in call.keywords})
    return bound


def constructed_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (kind, tag_keys) of every Histogram/Counter/Gauge built in cluster/metrics.py,
    resolving the local tuples, the local helper that builds a kind it is handed
    (`twin(Counter, name, doc, tag_keys)`) and the f-string-over-a-literal comprehension it uses."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    unresolved: list[str] = []

    def visit(node: ast.AST, env: dict) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            env = dict(env)
            for stmt in ast.walk(node):  # local `tags = ("model",)`-style tuples
                if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                        and isinstance(stmt.targets[0], ast.Name)):
                    value = _strs(stmt.value, env)
                    if value is not None and isinstance(stmt.value, (ast.Tuple, ast.List)):
                        env[stmt.targets[0].id] = value
                if isinstance(stmt, ast.FunctionDef) and stmt is not node:
                    env[f"def {stmt.name}"] = stmt
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)) and all(
                isinstance(g.target, ast.Name) and _literal(g.iter) is not None for g in node.generators):
            # a comprehension over literals (`{k: Gauge(f"omniray_kv_cache_{k}") for k in (...)}`):
            # unroll it; any other comprehension is walked as is, and a constructor inside
            # whose name depends on it is reported unresolved
            envs = [env]
            for gen in node.generators:
                envs = [{**e, gen.target.id: v} for e in envs for v in _literal(gen.iter)]
            bodies = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            for e in envs:
                for body in bodies:
                    visit(body, e)
            return
        if isinstance(node, ast.Call):
            func = node.func
            cls = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            helper = env.get(f"def {cls}")
            if helper is not None and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in KINDS:
                bound = _bind(helper, node)
                name, tags = _str(bound.get("name"), env), _strs(bound.get("tag_keys"), env)
                if name is None or tags is None:
                    unresolved.append(ast.unparse(node))
                else:
                    assert name not in found, f"{name} constructed twice"
                    found[name] = (KINDS[node.args[0].id], tags)
            elif cls in KINDS:
                kw = {k.arg: k.value for k in node.keywords}
                name_node = node.args[0] if node.args else kw.get("name")
                tags_node = (node.args[TAG_KEYS_ARG[cls]] if len(node.args) > TAG_KEYS_ARG[cls]
                             else kw.get("tag_keys"))
                name, tags = _str(name_node, env), _strs(tags_node, env)
                if name is None or tags is None:
                    unresolved.append(ast.unparse(node))
                else:
                    assert name not in found, f"{name} constructed twice"
                    found[name] = (KINDS[cls], tags)
        for child in ast.iter_child_nodes(node):
            visit(child, env)

    visit(ast.parse(METRICS_PY.read_text()), {})
    assert not unresolved, f"metric constructors this test cannot read: {unresolved}"
    return found


def scraped_names(name: str, kind: str) -> set[str]:
    """The series names Prometheus stores a ray.util.metrics metric under."""
    full = RAY_PREFIX + name
    if kind == "histogram":
        return {full + s for s in HISTOGRAM_SUFFIXES}
    if kind == "counter":
        return {full if full.endswith("_total") else full + "_total"}
    return {full}


def prom_labels(tags) -> set[str]:
    return {RENAMED.get(t, t) for t in tags}


# --- what the dashboard queries -------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[str, tuple[str, ...]]]:
    return table_metrics()


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def graph_panels(dash: dict) -> list[dict]:
    return [p for p in all_panels(dash) if p.get("type") != "row"]


def targets(dash: dict):
    for p in graph_panels(dash):
        for t in p["targets"]:
            yield p, t


def resolve(ident: str, exported: dict) -> str:
    """ray_omniray_* series name -> the omniray_* metric it belongs to."""
    for name, (kind, _) in exported.items():
        if ident in scraped_names(name, kind):
            return name
    bare = ident[len(RAY_PREFIX):]
    if exported.get(bare, ("",))[0] == "histogram":
        raise AssertionError(f"{ident} is a histogram: query {ident}_bucket, _sum or _count")
    raise AssertionError(f"{ident} is not a metric cluster/metrics.py exports")


# --- tests ----------------------------------------------------------------------------


def test_table_matches_constructors():
    table, code = table_metrics(), constructed_metrics()
    assert table, "no omniray_ rows in the cluster/metrics.py docstring table"
    assert set(table) == set(code), (
        f"table only: {sorted(set(table) - set(code))}; code only: {sorted(set(code) - set(table))}")
    for name in table:
        assert table[name][0] == code[name][0], f"{name}: table says {table[name][0]}, code builds {code[name][0]}"
        assert set(table[name][1]) == set(code[name][1]), (
            f"{name}: table tags {table[name][1]}, code tag_keys {code[name][1]}")


def test_readme_table_matches():
    assert table_metrics(README.read_text()) == table_metrics(), "dashboards/README.md's table drifted"


def test_dashboard_shape(dashboard):
    assert dashboard["uid"] == "omniray"
    assert dashboard["title"] == "OmniRay"
    assert dashboard["schemaVersion"] >= 27  # Ray 2.60's own dashboards are schemaVersion 27
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == "${datasource}", v["name"]
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert graph_panels(dashboard)
    for p in graph_panels(dashboard):
        assert p["datasource"] == "${datasource}", p["title"]
        assert p["targets"], f"panel {p['title']!r} has no target"
        assert any(t.get("expr", "").strip() for t in p["targets"]), f"panel {p['title']!r} has no expr"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]


def test_panels_do_not_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p.get("title")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p.get('title')!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p.get("title")


def test_queries_use_only_exported_metrics(dashboard, exported):
    # anywhere in the file: panel targets and template variable queries alike
    for ident in set(METRIC_RE.findall(DASHBOARD.read_text())):
        resolve(ident, exported)


def test_every_exported_metric_is_on_a_panel(dashboard, exported):
    used = {resolve(ident, exported) for _, t in targets(dashboard) for ident in METRIC_RE.findall(t["expr"])}
    assert set(exported) <= used, f"no panel shows {sorted(set(exported) - used)}"


def test_metric_kinds_are_queried_as_such(dashboard, exported):
    for p, t in targets(dashboard):
        expr = t["expr"]
        for ident in METRIC_RE.findall(expr):
            kind = exported[resolve(ident, exported)][0]
            if ident.endswith("_bucket") and kind == "histogram":
                assert "histogram_quantile(" in expr and re.search(r"\bby\s*\([^)]*\ble\b", expr), (
                    f"{p['title']!r}: {ident} outside histogram_quantile(... by (le))")
            if kind == "counter" or (kind == "histogram" and ident.endswith(HISTOGRAM_SUFFIXES)):
                assert re.search(r"\b(rate|irate|increase)\(\s*" + ident + r"\b", expr), (
                    f"{p['title']!r}: cumulative {ident} used without rate()/increase()")


def test_labels_exist(dashboard, exported):
    """Selectors, by-clauses and legends only name labels the queried metrics carry."""
    for p, t in targets(dashboard):
        expr, where = t["expr"], f"{p['title']!r}: {t['expr']}"
        metrics = {resolve(i, exported) for i in METRIC_RE.findall(expr)}
        carried = set().union(*(prom_labels(exported[m][1]) for m in metrics))
        for ident, body in re.findall(r"\b(ray_omniray_[a-z0-9_]+)\{([^}]*)\}", expr):
            labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", body))
            allowed = prom_labels(exported[resolve(ident, exported)][1]) | GLOBAL_FILTER_LABELS
            if ident.endswith("_bucket"):
                allowed.add("le")
            assert labels <= allowed, f"{where}: {ident} has no label {sorted(labels - allowed)}"
        grouped: set[str] = set()
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            labels = {x.strip() for x in clause.split(",") if x.strip()}
            assert labels <= carried | {"le"}, f"{where}: no label {sorted(labels - carried - {'le'})}"
            grouped |= labels
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
        assert legend <= grouped, f"{where}: legend label(s) {sorted(legend - grouped)} are aggregated away"


def test_counters_are_named_total(exported):
    """Prometheus' convention, and what rate() on the dashboard assumes: a count is a
    counter named `_total`, a gauge is a value now (never a running total)."""
    for name, (kind, _) in exported.items():
        assert (kind == "counter") == name.endswith("_total"), f"{name}: a {kind}"
