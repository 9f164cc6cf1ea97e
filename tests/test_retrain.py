"""The promotion rule of scheduled retraining (flows/retrain.py): which score a run is judged by,
and when a new model replaces the champion. The retraining flow itself runs in test_ablate.py."""

from __future__ import annotations

import re

import pytest

from flows.retrain import decide, score_of


def test_decision_rule():
    champ = {"version": "3", "score": 0.5}
    assert decide(0.4, None, "mean", 0.0)[0] == "promoted"
    assert decide(0.5, champ, "mean", 0.0)[0] == "promoted"
    assert decide(0.49, champ, "mean", 0.0)[0] == "kept"
    assert decide(0.49, champ, "mean", 0.02)[0] == "promoted"


def test_the_reason_names_both_scores_and_the_champion():
    decision, reason = decide(0.41, {"version": "7", "score": 0.5}, "nq-msmarco-hardneg", 0.05)
    assert decision == "kept"
    assert "0.4100" in reason and "champion v7 0.5000" in reason and "champion kept" in reason


def test_score_of_is_the_mean_or_one_named_task():
    scores = {"nq-msmarco-hardneg": 0.25, "stsb-en": 0.75}
    assert score_of(scores, "mean") == 0.5
    assert score_of(scores, "stsb-en") == 0.75
    missing = "retrain.metric 'sick' is not an evaluated task; have ['nq-msmarco-hardneg', 'stsb-en']"
    with pytest.raises(ValueError, match=re.escape(missing)):
        score_of(scores, "sick")
    with pytest.raises(ValueError, match="no evaluation scores"):
        score_of({}, "mean")
