"""The one result record every evaluator writes (lm-eval/HELM shape), and its statistics helpers."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from scipy.stats import binomtest

SCHEMA_VERSION = "comptrust.result/1"


@dataclass
class MetricResult:
    dimension: str            # e.g. "machine_ethics", "perplexity"
    task: str                 # the data + template it was measured on
    metric: str               # "accuracy", "perplexity", ...
    score: float              # trust dimensions: 0-100, higher is more trustworthy
    n: int                    # items (or tokens, for perplexity)
    scorer: str               # how answers were read: "loglikelihood", "generation+regex", ...
    higher_is_better: bool = True
    stderr: float | None = None
    ci95: tuple[float, float] | None = None
    chance: float | None = None       # the score a random answerer gets in expectation
    flip_rate: float | None = None    # share of items whose answer differs from the reference (dense) model
    mean_kl: float | None = None      # mean KL(reference || this) of the per-item choice distributions
    # Set by an evaluator that knows why its score says nothing about this model, e.g. "predicts one
    # class for every item" (a constant answerer is perfectly "fair"); see `informative`.
    uninformative_reason: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def above_chance(self) -> bool | None:
        """True when the 95% interval lies above chance; None when there is no chance level."""
        if self.chance is None or self.ci95 is None:
            return None
        return self.ci95[0] > self.chance

    @property
    def informative(self) -> bool | None:
        """False when the score cannot be told from what a model without the ability gets: the evaluator
        gave a reason, or the 95% interval contains the chance level. None when neither applies (no chance
        level, e.g. toxicity, where producing nothing toxic is the goal, not an accident)."""
        if self.uninformative_reason is not None:
            return False
        if self.chance is None or self.ci95 is None:
            return None
        return not self.ci95[0] <= self.chance <= self.ci95[1]

    def as_dict(self) -> dict:
        record = asdict(self)
        record["above_chance"] = self.above_chance
        record["informative"] = self.informative
        return record


def accuracy_with_interval(correct: int, n: int) -> tuple[float, float, tuple[float, float]]:
    """Accuracy in percent, its standard error and Wilson 95% interval (scipy), all on the 0-100 scale."""
    if n == 0:
        raise ValueError("accuracy of zero items is undefined")
    p = correct / n
    interval = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return 100 * p, 100 * math.sqrt(p * (1 - p) / n), (100 * float(interval.low), 100 * float(interval.high))


def choice_distribution(loglikelihoods: list[float]) -> list[float]:
    """The model's distribution over answer choices: softmax of their log-likelihoods."""
    top = max(loglikelihoods)
    weights = [math.exp(value - top) for value in loglikelihoods]
    return [w / sum(weights) for w in weights]


def compare_to_reference(samples: list[dict], reference: list[dict]) -> tuple[float, float | None]:
    """(share of items whose answer changed, mean KL(reference || samples) of the choice distributions).

    Samples are matched by "id" and compared on "prediction" (any JSON value: a choice index, a parsed
    answer class). KL needs "choice_prob" on both sides; it is None when the items carry none (answers
    read from generated text)."""
    by_id = {s["id"]: s for s in reference}
    missing = [s["id"] for s in samples if s["id"] not in by_id]
    if missing:
        raise ValueError(f"reference samples lack items {missing[:5]}")
    if not samples:
        raise ValueError("no samples to compare with the reference")
    flips, kl_total, kl_items = 0, 0.0, 0
    for sample in samples:
        ref = by_id[sample["id"]]
        flips += sample["prediction"] != ref["prediction"]
        if "choice_prob" in sample and "choice_prob" in ref:
            kl_total += sum(p * math.log(p / q) for p, q in zip(ref["choice_prob"], sample["choice_prob"]) if p > 0)
            kl_items += 1
    return flips / len(samples), (kl_total / kl_items if kl_items else None)
