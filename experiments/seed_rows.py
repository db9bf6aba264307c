"""How a leaderboard frame shows seed groups: a group's per-seed rows (``row_kind`` = ``seed``) stand behind one
``seed mean`` row, and these columns show their spread over the seeds. Shared by the tables and the plots."""

from __future__ import annotations

import pandas as pd

#: Columns whose spread over seeds is reported (``<column>_std``; task scores as ``std:<task>``).
SPREAD_COLUMNS = ("average", "retention_%", "ppl_pruned", "kl", "top1_agree_%", "rms_dp_correct", "speedup_prefill",
                  "speedup_decode", "ppl_healed", "kl_healed", "average_healed", "retention_healed_%", "reasoning_bpb")
SEED_MEAN = "seed mean"


def table_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows a table or plot shows: every row but the per-seed runs of a seed group (their mean stands for them)."""
    if "row_kind" not in frame:
        return frame
    return frame[frame["row_kind"] != "seed"].reset_index(drop=True)
