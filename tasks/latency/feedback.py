"""Hardware in the loop: the measured base/compressed latency ratios go to the cache the search reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.latency.best import base_engine
from tasks.latency.rows import Latency


def feed_back(cache_dir: Path, rows: list[Latency], models: dict[str, Any]) -> int:
    """Record every engine's batch-1 ratio per target in cache_dir/latency-<target>.json; how many."""
    from tasks.search.trial import LatencyCache

    by_key = {r.key: r for r in rows}
    n = 0
    for c in sorted((r for r in rows if r.model == "compressed" and r.batch == 1), key=lambda r: (r.target, r.engine)):
        base = by_key.get(("base", base_engine(c.engine), c.target, 1))
        if base is None:
            continue
        LatencyCache(cache_dir / f"latency-{c.target}.json", c.target).record(
            models["base"], models["compressed"], c.engine, base.median_ms, c.median_ms, emulated=bool(c.emulated))
        n += 1
    return n
