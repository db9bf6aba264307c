"""Options shared by the methods that re-score the model once per candidate (SLEB, Shortened-PPL,
BlockPruner, FinerCut), declared once here.

``score_samples``: how many calibration sequences score the candidates. 0 = all of them; N > 0 = the first N
(the calibration sample is already a seeded random draw, so the first N are a random subset of it). FinerCut's
reference scores 10 windows of 256 tokens, so FinerCut defaults to 10; the other methods default to 0 (all:
their numbers are those of the whole calibration set). Every selection records the sequences and real tokens
it scored on (``scored_samples``, ``scored_tokens``).

``evaluation`` (the methods scoring by ``NLL_cal``): ``tail`` runs only the layers from each candidate up
(`depthbench.calibration.service.CalibrationService.masked_nll`), ``full`` one whole pass per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from depthbench.errors import ConfigError
from depthbench.pruners.options import option

EVALUATIONS = ("tail", "full")

SCORE_SAMPLES_HELP = ("Calibration sequences that score the candidates: 0 = all of them; N > 0 = the first N "
                      "(the calibration sample is already a seeded random draw). At most calibration.n_samples.")


def score_samples_option(default: int) -> Any:
    """The ``score_samples`` field (one help text for every method; a method may change only the default)."""
    return option(default, SCORE_SAMPLES_HELP)


@dataclass
class ScoreSubset:
    """The option of methods that score candidates on the calibration data: which sequences score them."""

    score_samples: int = score_samples_option(0)


@dataclass
class NLLEvaluation(ScoreSubset):
    """The options shared by methods that score candidates by the calibration NLL with them skipped."""

    evaluation: str = option("tail", "How each candidate's NLL is computed: 'tail' runs only the layers from the "
                                     "candidate up, from the residual stream of the current model (the same numbers, "
                                     "fewer layer runs); 'full' runs one whole forward pass per candidate, as the "
                                     "reference does.")


def check_score_samples(method: str, score_samples: int) -> None:
    if score_samples < 0:
        raise ConfigError(f"{method} score_samples={score_samples!r}; allowed: 0 (all calibration sequences) or a "
                          f"positive number of sequences")


class ScoresCandidates:
    """Mixin of the pruners whose ``Options`` carry ``score_samples``: the run's config check refuses a subset larger
    than the calibration set before any weights are read (`depthbench.pruners.base.Pruner.check_calibration`)."""

    def check_calibration(self, n_samples: int, seq_len: int) -> None:
        if self.options.score_samples > n_samples:
            raise ConfigError(f"{self.name} score_samples={self.options.score_samples}: calibration.n_samples is "
                              f"{n_samples}; allowed: 0 (all) or at most {n_samples}")


def check_evaluation(method: str, evaluation: str) -> None:
    if evaluation not in EVALUATIONS:
        raise ConfigError(f"{method} evaluation={evaluation!r}; allowed: {', '.join(EVALUATIONS)}")


def scoring_subset(method: str, service, score_samples: int):
    """``(service, record)``: the service that scores candidates (``service`` itself for 0, else the same
    service on the first ``score_samples`` calibration sequences) and what it scores on, for the selection's
    scores: ``scored_samples`` and ``scored_tokens`` (real tokens). `ConfigError` naming the maximum when the
    calibration set holds fewer sequences (before any pass)."""
    if score_samples == 0:
        data = getattr(service, "calibration", None)  # a stand-in service (tests) may carry no data
        return service, {"scored_samples": data.n_samples if data else None,
                         "scored_tokens": data.n_tokens if data else None}
    available = service.calibration.n_samples
    if score_samples > available:
        raise ConfigError(f"{method} score_samples={score_samples}: the calibration set holds {available} sequences; "
                          f"allowed: 0 (all) or at most {available}")
    subset = service.first_sequences(score_samples)
    return subset, {"scored_samples": subset.calibration.n_samples, "scored_tokens": subset.calibration.n_tokens}


def candidate_nlls(service, candidates: list, skip: list, evaluation: str) -> dict:
    """``NLL_cal(skip + [c])`` for every candidate: ``tail`` runs only the layers from each candidate up
    (`CalibrationService.masked_nll`), ``full`` one whole forward pass per candidate (the same numbers)."""
    if evaluation == "tail":
        return service.masked_nll(candidates, skip=skip)
    return {c: service.nll(skip=[*skip, c]) for c in candidates}
