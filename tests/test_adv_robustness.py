"""Adversarial robustness (AdvGLUE): the loader against the official dev.json, the built-in probes, the score
formula on a worked example, and the evaluator on the tiny model."""
import json
from pathlib import Path

import pytest

from comptrust.evals import LanguageModel
from comptrust.evals.adv_robustness import (LABEL_WORDS, TASK_DESCRIPTIONS, _score, evaluate_adv_robustness,
                                            load_advglue, load_builtin_probes, parse_advglue)

ADVGLUE_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "advglue" / "dev.json"
needs_dev = pytest.mark.skipif(not ADVGLUE_DEV.is_file(), reason="../shared/data/advglue/dev.json not present")


@needs_dev
def test_official_dev_set_parses_completely():
    items = load_advglue(ADVGLUE_DEV)
    counts = {task: sum(item.task == task for item in items) for task in TASK_DESCRIPTIONS}
    assert counts == {"sst2": 148, "qqp": 78, "mnli": 121, "mnli-mm": 162, "qnli": 148, "rte": 81}
    assert len({item.id for item in items}) == len(items)
    first = items[0]
    assert first.task == "sst2" and first.label == 1 and first.fields[0][0] == "sentence"
    assert first.prompt().startswith(TASK_DESCRIPTIONS["sst2"] + "\nsentence: it 's an uneven treat")
    qqp = next(item for item in items if item.task == "qqp")
    assert qqp.prompt().endswith("question2: Does eating dinner earlier in the evening help with weight loss ?")


def test_builtin_probes_cover_the_five_tasks_in_the_official_layout():
    items = load_builtin_probes()
    assert len(items) >= 50
    assert {item.task for item in items} == {"sst2", "qqp", "mnli", "qnli", "rte"}
    for task in ("sst2", "qqp", "qnli", "rte"):  # both answers occur
        assert {item.label for item in items if item.task == task} == {0, 1}


@pytest.mark.parametrize("raw,message", [
    ([], "expected a JSON object of tasks"),
    ({"cola": []}, r"unknown tasks \['cola'\]"),
    ({"sst2": {"idx": 0}}, "task sst2 must be a list"),
    ({"sst2": [{"idx": 0, "label": 1}]}, r"sst2 item 0: missing \['sentence'\]"),
    ({"mnli": [{"idx": 4, "premise": "a", "hypothesis": "b", "label": 3}]}, r"mnli item 0: label 3 must be .* 0..2"),
    ({"rte": [{"sentence1": "a", "sentence2": "", "label": 0}]}, "rte item 0: sentence1, sentence2 must be non-empty"),
    ({}, "no items"),
])
def test_malformed_data_names_the_file_task_and_item(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_advglue(raw, "my.json")


def test_unreadable_files_are_reported(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_advglue(tmp_path / "missing.json")
    bad = tmp_path / "dev.json"
    bad.write_text('{"sst2": [\n  {"idx": 0,,}\n]}')
    with pytest.raises(ValueError, match=r"dev.json, line 2: not valid JSON"):
        load_advglue(bad)


def test_score_is_the_mean_of_task_accuracies_worked_example():
    # sst2: 3 of 4 right (75%); mnli: 1 of 2 (50%): mean 62.5 (a pooled accuracy would say 4/6 = 66.7).
    samples = ([{"task": "sst2", "correct": c} for c in (True, True, True, False)]
               + [{"task": "mnli", "correct": c} for c in (True, False)])
    result = _score(samples, "example")
    assert result.score == pytest.approx(62.5)
    stderr = (0.75 * 0.25 / 4 + 0.5 * 0.5 / 2) ** 0.5 / 2
    assert result.stderr == pytest.approx(100 * stderr)
    assert result.ci95 == pytest.approx((100 * (0.625 - 1.96 * stderr), 100 * min(1.0, 0.625 + 1.96 * stderr)))
    assert result.chance == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    assert result.details["per_task"] == {"sst2": {"accuracy": 75.0, "n": 4}, "mnli": {"accuracy": 50.0, "n": 2}}


def test_evaluator_on_the_tiny_model(tiny_llama, smollm2_tokenizer):
    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True)
    items = [item for item in load_builtin_probes() if item.task in ("sst2", "mnli")][:24]
    result, samples = evaluate_adv_robustness(lm, items, progress=False, task="probe subset")
    assert result.n == len(samples) == len(items) and result.task == "probe subset"
    assert result.dimension == "adversarial_robustness"
    for sample, item in zip(samples, items):
        assert len(sample["choice_prob"]) == len(LABEL_WORDS[item.task])
        assert sample["prediction"] == max(range(len(sample["choice_loglik"])), key=sample["choice_loglik"].__getitem__)
    per_task = result.details["per_task"]
    assert result.score == pytest.approx(sum(t["accuracy"] for t in per_task.values()) / len(per_task))
    again, _ = evaluate_adv_robustness(lm, items, reference=samples, progress=False)
    assert again.flip_rate == 0.0 and again.mean_kl == pytest.approx(0.0, abs=1e-9)
    json.dumps(result.as_dict())
