"""Comparison report: answer a card's question from its runs' logs.

    python -m fastdiff.report RUN_A RUN_B [more runs…] [--card e6|e9] [--out DIR]

Reads each run's metrics.jsonl, config.yaml, summary.json and sample grids;
writes PNG plots, REPORT.md, a self-contained report.html and report.json. Runs are
grouped into arms (their config without the seed) and paired by seed; each of the
card's criteria is an estimate with a 95% interval (a paired t-interval over seeds
when there are several, the runs' own standard errors when one) and a status:
pass / fail when the whole interval lies on one side of the threshold, inconclusive
when it straddles it, not evaluable when data is missing (which never passes).
"""

from fastdiff.report.criteria import (
    Criterion,
    confound_sentence,
    curvature_reduction,
    evaluate,
    exploding_curvature,
    fid_band,
    fid_gap_persists,
    fid_provenance_differs,
    fid_ratio,
    loss_pathology,
    recall_kept,
    spike_count,
)
from fastdiff.report.runs import Run, group_arms, pairs_of
from fastdiff.stats import FAIL, INCONCLUSIVE, NA, PASS

__all__ = [
    "FAIL",
    "INCONCLUSIVE",
    "NA",
    "PASS",
    "Criterion",
    "Run",
    "confound_sentence",
    "curvature_reduction",
    "evaluate",
    "exploding_curvature",
    "fid_band",
    "fid_gap_persists",
    "fid_provenance_differs",
    "fid_ratio",
    "group_arms",
    "loss_pathology",
    "pairs_of",
    "recall_kept",
    "spike_count",
]
