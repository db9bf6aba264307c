"""What every benchmark script does last: print its JSON record and, with ``--output``, write it atomically; and
reading values out of a prune's nested record."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def machine_fields() -> dict:
    """CPUs, the load at the end (the machine is shared: read ratios, not seconds) and the date."""
    return {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def emit(record: dict, output: str | Path | None) -> None:
    text = json.dumps(record, indent=2)
    print(text)
    if output:
        from depthbench import atomic

        atomic.write_text(output, text + "\n")


def values_of(record, key: str) -> list:
    """Every value stored under ``key`` anywhere in a nested record of dicts and lists (e.g. a replacement's
    ``training_seconds``: one per trained block of ReplaceMe-cosine, one at the top for LLM-Streamline)."""
    if isinstance(record, dict):
        return [*([record[key]] if key in record else []),
                *(v for k, item in record.items() if k != key for v in values_of(item, key))]
    if isinstance(record, list):
        return [v for item in record for v in values_of(item, key)]
    return []
