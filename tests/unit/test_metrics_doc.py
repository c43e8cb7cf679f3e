"""docs/metrics.md lists every metric the components register, with its type."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from eventflow.metrics import ConsumerMetrics, IngestMetrics, ReaperMetrics

DOC = (Path(__file__).resolve().parents[2] / "docs/metrics.md").read_text()


def test_every_registered_metric_is_documented() -> None:
    missing = []
    for cls in (IngestMetrics, ConsumerMetrics, ReaperMetrics):
        registry = CollectorRegistry()
        cls(registry)
        for family in registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            if f"| `{name}` | {family.type} |" not in DOC:
                missing.append(name)
    assert not missing, f"add to docs/metrics.md: {missing}"
