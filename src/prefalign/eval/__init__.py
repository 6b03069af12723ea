"""Evaluation: offline judges (one measurable score per preference) and collapse guards."""

from .guards import (
    DEFAULT_THRESHOLDS,
    GuardReport,
    GuardThresholds,
    guard_report,
    is_collapsed,
    is_truncated,
    non_dictionary_share,
    perplexity,
    repetition_rate,
)
from .judges import Judge, Measure, distinct_n, free_text_judge, judge_for, judges_for, list_judges, mtld

__all__ = [
    "DEFAULT_THRESHOLDS",
    "GuardReport",
    "GuardThresholds",
    "Judge",
    "Measure",
    "distinct_n",
    "free_text_judge",
    "guard_report",
    "is_collapsed",
    "is_truncated",
    "judge_for",
    "judges_for",
    "list_judges",
    "mtld",
    "non_dictionary_share",
    "perplexity",
    "repetition_rate",
]
