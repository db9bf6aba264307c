"""The short table a run prints: layers, parameters, perplexity before/after, time and memory."""

from __future__ import annotations


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _short(task: str) -> str:
    return task.removeprefix("bigbench_").removesuffix("_multiple_choice")


def _ranges(layers: list[int]) -> str:
    parts, start = [], None
    for i, k in enumerate(layers):
        if start is None:
            start = k
        if i + 1 == len(layers) or layers[i + 1] != k + 1:
            parts.append(f"{start}" if start == k else f"{start}..{k}")
            start = None
    return ", ".join(parts) or "-"


def sub_block_lines(pruning: dict) -> list[str]:
    """A line naming the removed attention / MLP sub-blocks (none for whole-layer methods and older records)."""
    sub_blocks = pruning.get("removed_sub_blocks") or []
    if not sub_blocks:
        return []
    return [f"removed sub-blocks {', '.join(sub_blocks)}: {pruning['removed_attention_modules']} attention and "
            f"{pruning['removed_mlp_modules']} MLP modules in all (whole layers included), "
            f"{pruning['layer_equivalents_removed']:.2f} layer-equivalents, "
            f"{100 * pruning['kv_cache_fraction_removed']:.1f}% of the KV cache"]


def healed_rows(healed: dict | None, base: dict) -> list[tuple[str, str]]:
    """The healed model's numbers (``metrics.healed``, healing=lora), shown under the pruned column."""
    if not healed:
        return []
    rows = [("healed: held-out perplexity", f"{healed['heldout_perplexity']['perplexity']:.2f}")]
    if "average" in healed and "average" in base:
        rows.append(("healed: benchmark average", f"{healed['average']:.3f}"))
    if healed.get("fidelity"):
        f = healed["fidelity"]
        rows += [("healed: KL(dense||healed)", f"{f['kl_mean']:.3f} (p99 {f['kl_p99']:.2f})"),
                 ("healed: top-1 agreement", f"{f['top1_agreement_percent']:.1f}%")]
    return rows


def healing_lines(healing: dict | None) -> list[str]:
    if not healing or not healing.get("steps"):
        return []
    return [f"healed with LoRA after pruning: {healing['steps']} steps, {healing['tokens']:,} tokens, "
            f"{healing['seconds']:.0f} s, training loss {healing['loss_first']:.3f} -> {healing['loss_last']:.3f}"]


def summary_table(record: dict) -> str:
    p = record["pruning"]
    m = record.get("metrics", {})
    rows = [("layers", str(p["num_layers_before"]), str(p["num_layers_after"])),
            ("parameters", _millions(p["parameters_before"]["total"]), _millions(p["parameters_after"]["total"])),
            ("parameters w/o embeddings", _millions(p["parameters_before"]["without_embeddings"]),
             _millions(p["parameters_after"]["without_embeddings"]))]
    if "base" in m:
        rows.append(("held-out perplexity", f"{m['base']['heldout_perplexity']['perplexity']:.2f}",
                     f"{m['pruned']['heldout_perplexity']['perplexity']:.2f}"))
        for task, value in m["base"].get("tasks", {}).items():
            rows.append((f"  {_short(task)}", f"{value:.3f}", f"{m['pruned']['tasks'][task]:.3f}"))
        if "average" in m["base"]:
            rows.append(("benchmark average", f"{m['base']['average']:.3f}", f"{m['pruned']['average']:.3f}"))
        if m.get("retention", {}).get("average_percent") is not None:
            interval = (m["retention"].get("intervals") or {}).get("retention_average_percent")
            rows.append(("retention (avg of task ratios)", "100%", f"{m['retention']['average_percent']:.1f}%"
                         + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "")))
        if m.get("fidelity"):
            f = m["fidelity"]
            rows.append(("KL(dense||pruned) per token", "0", f"{f['kl_mean']:.3f} (p99 {f['kl_p99']:.2f})"))
            rows.append(("top-1 agreement", "100%", f"{f['top1_agreement_percent']:.1f}%"))
        for name, value in healed_rows(m.get("healed"), m["base"]):
            rows.append((name, "", value))
        if "speed" in m:
            for kind in ("prefill", "decode"):
                s = m["speedup"]
                interval = s.get(f"{kind}_interval")
                text = f"x{s[kind]:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")
                if s.get(f"{kind}_analytic"):
                    flag = "" if s.get(f"{kind}_consistent", True) else " (!)"
                    text += f", FLOPs x{s[f'{kind}_analytic']:.2f}{flag}"
                rows.append((f"{kind} tokens/s", f"{m['speed']['base'][f'{kind}_tokens_per_s']:.0f}",
                             f"{m['speed']['pruned'][f'{kind}_tokens_per_s']:.0f} ({text})"))
    width = max(len(r[0]) for r in rows) + 2
    col = max(12, max(len(r[2]) for r in rows) + 2)
    lines = [
        f"{record['method']} on {record['model']['name']}, ratio {record['ratio']}: removed layers "
        f"{_ranges(p['removed_layers'])} ({len(p['removed_layers'])} of {p['num_layers_before']}; "
        f"{100 * p['fraction_parameters_removed']:.1f}% of parameters, "
        f"{100 * p['fraction_parameters_removed_without_embeddings']:.1f}% without embeddings)",
        *sub_block_lines(p),
        *healing_lines(record.get("healing")),
        "",
        f"{'':<{width}}{'base':>12}{'pruned':>{col}}",
        *(f"{name:<{width}}{a:>12}{b:>{col}}" for name, a, b in rows),
        "",
        f"{'stage':<{width}}{'seconds':>12}{'peak RSS':>12}",
    ]
    for name, s in record["stages"].items():
        lines.append(f"{name:<{width}}{s['seconds']:>12.2f}{s['peak_rss_bytes'] / 2**30:>10.2f}GB")
    return "\n".join(lines)
