"""The shipped dashboard and alert rules only name metrics payroute exports, with the labels it uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from router.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def exported() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for metric in Metrics().registry.collect():
        labels: set[str] = set()
        for sample in metric.samples:
            labels |= set(sample.labels)
        out[metric.name] = labels
    # label names are known before any sample exists: read them off the collectors
    m = Metrics()
    for attr in vars(m).values():
        names = getattr(attr, "_labelnames", None)
        if names is not None:
            out.setdefault(attr._name, set()).update(names)  # type: ignore[attr-defined]
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(payroute_[a-z_]+)", expr))


def base(name: str) -> str:
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def exprs() -> list[str]:
    dash = json.loads((ROOT / "config/dashboards/payroute.json").read_text())
    found = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((ROOT / "config/alerts/payroute.rules.yaml").read_text())
    found += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return found


def test_every_metric_in_dashboards_and_alerts_is_exported_with_its_labels() -> None:
    known = exported()
    for expr in exprs():
        for name in metric_names(expr):
            assert base(name) in known, f"{name} is not exported (in {expr!r})"
            used = set(re.findall(r"([a-z_]+)\s*=~?", expr.split(name, 1)[1].split("}", 1)[0])) if "{" in expr.split(name, 1)[1][:1] else set()
            assert used <= known[base(name)] | {"le"}, f"{name} has no label {used - known[base(name)]}"
    assert len(exprs()) >= 15


def test_label_sets_are_read() -> None:
    known = exported()
    assert known["payroute_attempts"] >= {"channel", "outcome"}
    assert {"status"} <= known["payroute_payments"]
