"""deploy/grafana: the dashboard, its provisioning and the alert rules, checked offline.

Every metric a dashboard query, a dashboard variable or an alert rule names must be a series the
worker exports (read from a real :class:`Metrics` registry, suffixes as the client library writes
them), with the labels it filters and groups by; the dashboard must be a well-formed Grafana
dashboard; the compose stack must mount the provisioning files that exist in the tree.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from worker.observability import Metrics

from .test_compose import COMPOSE_DIR, bind_mounts

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "signal-worker.json"
RULES = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"

# Labels Prometheus attaches to every scraped series (job/instance always; the rest from
# Kubernetes service discovery via the ServiceMonitor).
TARGET_LABELS = frozenset({"job", "instance", "pod", "namespace", "container", "service", "endpoint"})
# Series the alert rules use that other exporters provide.
EXTERNAL_SERIES = frozenset({"kube_pod_container_status_restarts_total"})
# Grafana's built-in variables.
GRAFANA_BUILTINS = frozenset({
    "__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms", "__auto",
})

AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
})
FUNCTIONS = AGGREGATIONS | frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "double_exponential_smoothing",
    "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase",
    "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
    "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear", "present_over_time",
    "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort",
    "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time",
    "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
    "start", "end",  # the @ modifier's start() / end()
})
# Words followed by a parenthesised list of label names.
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = LABEL_LIST_KEYWORDS | frozenset({"and", "or", "unless", "atan2", "bool", "offset", "inf", "nan"})

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<var>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:[a-zA-Z]+\d*)*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){},@])
  | (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
    """,
    re.X,
)
_MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})


@dataclass
class Query:
    """What one PromQL expression names."""

    metrics: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    matchers: set[tuple[str | None, str]] = field(default_factory=set)  # (metric or None, label)
    grouping: set[str] = field(default_factory=set)  # labels of by/without/on/ignoring/group_*
    variables: set[str] = field(default_factory=set)  # Grafana $variables


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot tokenise PromQL at {expr[pos:pos + 20]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            out.append((kind, match.group()))
        pos = match.end()
    return out


def _variables(text: str) -> set[str]:
    return {m.group(1) or m.group(2) for m in re.finditer(r"\$\{(\w+)[^}]*\}|\$(\w+)", text)}


def parse_promql(expr: str) -> Query:
    """Metric names, functions and label names of a PromQL expression (with Grafana variables).

    A metric name is an identifier that is not followed by ``(`` (a function or aggregation), is
    not a keyword, and is not inside a label list (``by (...)``) or a selector's braces (``{...}``).
    """
    query = Query(variables=_variables(expr))
    tokens = _tokens(expr)
    depth = {"(": 0, "{": 0}
    for kind, text in tokens:
        if kind == "op" and text in "(){}":
            depth["(" if text in "()" else "{"] += 1 if text in "({" else -1
            if min(depth.values()) < 0:
                break
    if any(depth.values()):
        raise ValueError(f"unbalanced brackets in {expr!r}")
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in LABEL_LIST_KEYWORDS and nxt == ("op", "("):
            i += 2
            expect_label = True  # labels and commas alternate
            while i < len(tokens) and tokens[i] != ("op", ")"):
                if tokens[i][0] == "ident" and expect_label:
                    query.grouping.add(tokens[i][1])
                elif tokens[i] != ("op", ",") or expect_label:
                    raise ValueError(f"unexpected {tokens[i][1]!r} in a label list of {expr!r}")
                expect_label = not expect_label
                i += 1
        elif kind == "ident" and (nxt == ("op", "(") or (text in AGGREGATIONS and nxt[1] in ("by", "without"))):
            query.functions.add(text)  # a call, or an aggregation whose `by (...)` comes first
        elif kind == "ident" and text.lower() in KEYWORDS:
            pass
        elif kind == "ident" or (kind == "op" and text == "{"):
            metric = text if kind == "ident" else None
            if metric is not None:
                query.metrics.add(metric)
                i += 1
            if i < len(tokens) and tokens[i] == ("op", "{"):
                i += 1
                labels = set()
                while i < len(tokens) and tokens[i] != ("op", "}"):
                    if tokens[i][0] == "ident" and i + 2 < len(tokens):
                        label, op, value = tokens[i][1], tokens[i + 1][1], tokens[i + 2]
                        if op not in _MATCH_OPS or value[0] != "string":
                            raise ValueError(f"bad matcher after {label!r} in {expr!r}")
                        if label == "__name__" and op == "=":
                            metric = value[1][1:-1]
                            query.metrics.add(metric)
                        labels.add(label)
                        i += 3
                    elif tokens[i] == ("op", ","):
                        i += 1
                    else:
                        raise ValueError(f"unexpected {tokens[i][1]!r} in a selector of {expr!r}")
                query.matchers |= {(metric, label) for label in labels}
            else:
                continue  # a bare metric name: the token after it is not a selector
        i += 1
    return query


def parse_variable_query(text: str) -> Query:
    """A Grafana Prometheus variable query: ``label_values(selector, label)`` or plain PromQL."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", text, re.S)
    if match is None:
        return parse_promql(text)
    query = parse_promql(match.group(1))
    query.grouping.add(match.group(2))
    return query


def exported_series() -> dict[str, frozenset[str]]:
    """Series name -> label names, exactly as the worker's registry exposes them.

    Every labelled metric gets one child so that its samples (``_total``, ``_bucket`` with ``le``,
    ``_count``, ``_sum``, ``_created``, ``_info``) and labels appear in ``collect()``.
    """
    metrics = Metrics()
    for collector in vars(metrics).values():
        labelnames = getattr(collector, "_labelnames", ())  # no public accessor in prometheus_client
        if isinstance(collector, MetricWrapperBase) and labelnames:
            collector.labels(*["probe"] * len(labelnames))
    metrics.set_model_info(model_version="probe", scheduler="probe", steps=1, samples=1, device="cpu",
                           timeframe="5m", calibrated_for="probe")
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        assert family.samples, f"{family.name} exports no sample even with a child: probe it above"
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


def check_query(query: Query, series: dict[str, frozenset[str]], where: str) -> list[str]:
    """Problems of one parsed query against the exported series; empty when it is sound."""
    problems = []
    known = {m for m in query.metrics if m in series}
    for metric in sorted(query.metrics - set(series) - EXTERNAL_SERIES):
        problems.append(f"{where}: unknown metric {metric}")
    for function in sorted(query.functions - FUNCTIONS):
        problems.append(f"{where}: unknown PromQL function {function}()")
    for selected, label in sorted(query.matchers, key=str):
        if selected in series and label != "__name__" and label not in series[selected] | TARGET_LABELS:
            problems.append(f"{where}: {selected} has no label {label!r}")
    if known and not query.metrics & EXTERNAL_SERIES:
        labels = set().union(*(series[m] for m in known)) | TARGET_LABELS
        for label in sorted(query.grouping - labels):
            problems.append(f"{where}: groups by {label!r}, which none of {sorted(known)} has")
    return problems


# ---- the dashboard


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def data_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])  # a collapsed row carries its panels
        else:
            yield panel


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return str(query["query"] if isinstance(query, dict) else query)


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, Query]]:
    for panel in data_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target.get('refId')}", parse_promql(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", parse_variable_query(variable_query(variable))


def dashboard_problems(dashboard: dict[str, Any], series: dict[str, frozenset[str]]) -> list[str]:
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_BUILTINS
    problems = []
    for where, query in dashboard_queries(dashboard):
        problems += check_query(query, series, where)
        problems += [f"{where}: undefined variable ${name}" for name in sorted(query.variables - defined)]
    return problems


@pytest.fixture(scope="module")
def series() -> dict[str, frozenset[str]]:
    return exported_series()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def test_exported_series_carry_the_client_suffixes(series: dict[str, frozenset[str]]) -> None:
    # The names the checks below compare against are the ones Prometheus scrapes.
    assert "signal_worker_candles_total" in series and "signal_worker_candles" not in series
    assert {"signal_worker_end_to_end_seconds_bucket", "signal_worker_end_to_end_seconds_count",
            "signal_worker_end_to_end_seconds_sum"} <= set(series)
    assert "le" in series["signal_worker_end_to_end_seconds_bucket"]
    assert series["signal_worker_consumer_lag"] == {"topic", "partition"}
    assert "model_version" in series["signal_worker_model_info"]


def test_promql_parser_separates_metrics_from_functions_labels_and_keywords() -> None:
    query = parse_promql(
        'sum by (reason) (rate(a_total{kind="final", instance=~"$instance"}[$__rate_interval] offset 1d))'
        " / clamp_min(b + on (pod) group_left (x) c, 1e-9) > bool 0.01 and {__name__=\"d\", y!=\"z\"}"
        ' or histogram_quantile(0.99, sum without (le) (rate(e_bucket[5m:1m] @ end())))'
    )
    assert query.metrics == {"a_total", "b", "c", "d", "e_bucket"}
    assert query.functions == {"sum", "rate", "clamp_min", "histogram_quantile", "end"}
    assert query.grouping == {"reason", "pod", "x", "le"}
    assert query.matchers == {("a_total", "kind"), ("a_total", "instance"), ("d", "__name__"), ("d", "y")}
    assert query.variables == {"instance", "__rate_interval"}
    assert parse_variable_query("label_values(f{g=\"h\"}, instance)").metrics == {"f"}
    for broken in ("sum(rate(a[5m])", "a{b=\"c\"", "sum by (x y) (a)", "a{b}", "a) + (b"):
        with pytest.raises(ValueError):
            parse_promql(broken)


def test_dashboard_queries_only_use_exported_metrics_and_labels(
    dashboard: dict[str, Any], series: dict[str, frozenset[str]]
) -> None:
    queries = list(dashboard_queries(dashboard))
    assert len(queries) > 20
    assert dashboard_problems(dashboard, series) == []


def _edit_queries(dashboard: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A copy of the dashboard with ``old`` replaced by ``new`` in every panel query (at least one)."""
    edited = copy.deepcopy(dashboard)
    hits = 0
    for panel in data_panels(edited):
        for target in panel["targets"]:
            hits += old in target["expr"]
            target["expr"] = target["expr"].replace(old, new)
    assert hits, f"no query contains {old!r}"
    return edited


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        ("signal_worker_conflated_total", "signal_worker_conflated_bars_total",
         "unknown metric signal_worker_conflated_bars_total"),
        ("signal_worker_end_to_end_seconds_bucket", "signal_worker_end_to_end_seconds",
         "unknown metric signal_worker_end_to_end_seconds"),  # a histogram is only its _bucket/_sum/_count
        ("sum by (reason)", "sum by (cause)", "groups by 'cause'"),
        ('{interval="90"', '{level="90"', "signal_worker_online_coverage has no label 'level'"),
        ("histogram_quantile(", "histogram_quantil(", "unknown PromQL function histogram_quantil()"),
        ("$__rate_interval", "$__rate_windo", "undefined variable $__rate_windo"),
        ('"$instance"', '"$replica"', "undefined variable $replica"),
    ],
)
def test_dashboard_check_catches_a_broken_query(
    dashboard: dict[str, Any], series: dict[str, frozenset[str]], old: str, new: str, reported: str
) -> None:
    # The check above can fail: the same dashboard with one name changed is rejected, naming it.
    problems = dashboard_problems(_edit_queries(dashboard, old, new), series)
    assert any(reported in problem for problem in problems), problems


def test_dashboard_panels_cover_what_operators_need(dashboard: dict[str, Any]) -> None:
    used = set().union(*(q.metrics for _, q in dashboard_queries(dashboard)))
    required = {
        "signal_worker_consumer_lag", "signal_worker_candles_total", "signal_worker_forecasts_total",
        "signal_worker_end_to_end_seconds_bucket", "signal_worker_sampling_seconds_bucket",
        "signal_worker_batch_size_bucket", "signal_worker_dead_letters_total", "signal_worker_conflated_total",
        "signal_worker_skipped_total", "signal_worker_redis_errors_total", "signal_worker_broker_errors_total",
        "signal_worker_online_coverage", "signal_worker_online_crps", "signal_worker_online_scored_total",
        "signal_worker_ready", "signal_worker_paused_partitions",
    }
    assert required <= used, f"no panel shows {sorted(required - used)}"
    by_title = {p["title"]: p for p in data_panels(dashboard)}
    lag = by_title["Consumer lag per partition"]["targets"][0]["expr"]
    assert parse_promql(lag).grouping >= {"partition"}
    e2e = [t["expr"] for t in by_title["End-to-end latency p50 / p99"]["targets"]]
    assert any("histogram_quantile(0.5," in e for e in e2e) and any("histogram_quantile(0.99," in e for e in e2e)
    calibration = [t["expr"] for p in data_panels(dashboard) for t in p["targets"] if "online_" in t["expr"]]
    assert all("by (horizon" in e for e in calibration), "calibration is shown per horizon"


def test_dashboard_is_a_valid_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in dashboard, f"dashboard has no {key!r}"
    assert dashboard.get("id") is None, "a provisioned or imported dashboard must not carry a database id"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert {"from", "to"} <= set(dashboard["time"])
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for r in dashboard["panels"] for p in r.get("panels", [])]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    known_types = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "state-timeline", "heatmap", "text",
                   "histogram", "piechart"}
    for panel in dashboard["panels"]:
        assert panel["type"] in known_types, panel["type"]
        assert panel.get("title"), f"panel {panel['id']} has no title"
        if panel["type"] == "row":
            assert "targets" not in panel and panel["gridPos"]["w"] == 24
    for panel in data_panels(dashboard):
        assert panel.get("description"), f"{panel['title']!r} has no description (the hover help)"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("targets"), f"{panel['title']!r} has no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{panel['title']!r} repeats a refId"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()


def test_dashboard_layout_has_no_overlaps(dashboard: dict[str, Any]) -> None:
    boxes = []
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert pos["x"] >= 0 and pos["y"] >= 0 and pos["w"] >= 1 and pos["h"] >= 1, panel["title"]
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']!r} is wider than the 24-column grid"
        boxes.append((panel["title"], pos["x"], pos["y"], pos["x"] + pos["w"], pos["y"] + pos["h"]))
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1:]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{a!r} overlaps {b!r}"


def test_dashboard_datasource_is_a_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert variable_query(variable) == variable["definition"]


# ---- the alert rules


def test_alert_rules_only_use_exported_metrics_and_labels(series: dict[str, frozenset[str]]) -> None:
    rules = [
        rule
        for doc in yaml.safe_load_all(RULES.read_text())
        if doc and doc["kind"] == "PrometheusRule"
        for group in doc["spec"]["groups"]
        for rule in group["rules"]
    ]
    assert len(rules) >= 10
    problems = []
    for rule in rules:
        query = parse_promql(rule["expr"])
        assert query.metrics, f"{rule['alert']} names no metric"
        assert not query.variables, f"{rule['alert']} uses a Grafana variable"
        problems += check_query(query, series, f"alert {rule['alert']}")
    assert problems == []


# ---- provisioning


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    return data


def _host_path(mounts: dict[str, Path], container_path: str) -> Path:
    for target, source in mounts.items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(target)
    raise AssertionError(f"{container_path} is not mounted")


def test_grafana_provisioning_files_are_mounted_and_exist() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    for host in mounts.values():
        assert host.exists(), f"compose mounts {host}, which does not exist"
    datasources = _host_path(mounts, "/etc/grafana/provisioning/datasources")
    dashboards = _host_path(mounts, "/etc/grafana/provisioning/dashboards")
    assert datasources == GRAFANA / "provisioning" / "datasources"
    assert dashboards == GRAFANA / "provisioning" / "dashboards"
    assert list(datasources.glob("*.yaml")) and list(dashboards.glob("*.yaml"))
    for provider_file in dashboards.glob("*.yaml"):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            assert provider["type"] == "file"
            folder = _host_path(mounts, provider["options"]["path"])
            assert folder.is_dir() and DASHBOARD in folder.glob("*.json"), f"{provider_file.name} loads nothing"
    env = grafana["environment"]
    home = _host_path(mounts, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == DASHBOARD


def test_grafana_datasource_points_at_the_compose_prometheus() -> None:
    compose = _compose()
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["uid"] and datasource["isDefault"] is True
    match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)/?", datasource["url"])
    assert match, datasource["url"]
    assert match.group(1) in compose["services"]
    assert any(p.endswith(f":{match.group(2)}") for p in compose["services"][match.group(1)]["ports"])
    scrape = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    # $__rate_interval is only right when Grafana knows the scrape interval.
    assert datasource["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]
    assert grafana_depends_on_prometheus(compose)


def grafana_depends_on_prometheus(compose: dict[str, Any]) -> bool:
    return bool(compose["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy")


def test_operations_guide_explains_every_panel(dashboard: dict[str, Any]) -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = guide.split('<a id="dashboard"></a>', 1)[1]
    for panel in dashboard["panels"]:
        assert f"**{panel['title']}**" in section or f"| {panel['title']} |" in section, (
            f"docs/operations.md#dashboard does not explain the panel {panel['title']!r}"
        )
