"""A /metrics scrape as {(name, labels): value}, and the difference of two scrapes."""

from __future__ import annotations

from collections import Counter

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def scrape(srv) -> dict[tuple[str, frozenset], float]:
    """The exposition text /metrics serves, rendered from the server's registry (no HTTP round trip)."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(srv.server.metrics.registry).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def delta(before: dict, after: dict, name: str, *by: str) -> Counter:
    """How much the counter `name` grew between two scrapes, keyed by the values of the labels `by`
    (one label: the value itself; several: a tuple); keys that did not grow are left out."""
    out: Counter = Counter()
    for (n, labels), value in after.items():
        if n == name:
            grown = value - before.get((n, labels), 0.0)
            if grown:
                key = tuple(dict(labels)[b] for b in by)
                out[key[0] if len(by) == 1 else key] += int(grown)
    return out


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)
