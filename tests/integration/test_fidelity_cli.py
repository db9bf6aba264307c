"""`depthbench pruner=uidl scale=fast` on the user's own held-out text (evaluation=local) writes the fidelity
metrics and the interleaved speed-up with its interval and analytic ratio into result.json."""

import json

import pytest

from tests.integration.conftest import needs_offline_packages, run_cli

pytestmark = [pytest.mark.integration, needs_offline_packages]

TEXT = ("The river rises in the hills north of the town and flows south through farmland before it reaches the "
        "sea. In the nineteenth century mills were built along its banks, and the town grew around them. ")


def test_uidl_fast_writes_fidelity_for_a_local_heldout_file(tmp_path):
    heldout = tmp_path / "mine.txt"
    heldout.write_text("\n\n".join(TEXT * (i + 2) for i in range(6)), encoding="utf-8")
    run_dir = tmp_path / "run"
    proc = run_cli("pruner=uidl", "scale=fast", "benchmark=none", "logger=none", "save_model=false", "progress=false",
                   "evaluation=local", f"evaluation.path={heldout}", "efficiency.budget_s=5",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "result.json").read_text())
    fid = record["metrics"]["fidelity"]
    assert fid["tokens"] == record["metrics"]["pruned"]["heldout_perplexity"]["tokens"]
    assert fid["kl_mean"] > 0 and fid["kl_p90"] <= fid["kl_p99"] and 0 <= fid["top1_agreement_percent"] <= 100
    assert fid["kl_error_bound"] >= 0 and fid["reference_bytes_per_token"] == 8 * 64 + 12
    assert "local file" in record["config"]["evaluation"]["perplexity"]["source"] or \
        record["config"]["evaluation"]["perplexity"]["path"] == str(heldout)
    s = record["metrics"]["speedup"]
    assert s["rounds"] == 2 and s["prefill_analytic"] > 1 and len(s["prefill_interval"]) == 2
    assert record["metrics"]["speed"]["dense_copy_bytes"] > 100e6  # a bfloat16 copy of the 135M model
