"""Save a pruned model as a plain ``save_pretrained`` directory plus its ``pruning.json``.

The directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and no custom code. It is
written to a temporary sibling and renamed into place, so a crash leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path

from depthbench import atomic

METADATA_FILE = "pruning.json"


def save_pruned(model, tokenizer, directory: str | Path, metadata: dict) -> Path:
    directory = Path(directory)
    with atomic.directory(directory) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / METADATA_FILE, metadata)
    return directory
