"""What every benchmark script does last: print its JSON record and, with ``--output``, write it atomically."""

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
