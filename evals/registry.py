"""The task registry: each trust dimension registers one Dimension (its tasks, the official files it reads,
and its evaluator), and every evaluator has the same signature, evaluate(lm, context) -> (result, samples)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from comptrust.evals.lm import LanguageModel
from comptrust.evals.schema import MetricResult

SUITES = ("quick", "full")
READINGS = ("loglikelihood", "generation")


@dataclass(frozen=True)
class EvalContext:
    """What an evaluator needs besides the model.

    suite: "quick" (minutes on 2 cores for all dimensions together; the built-in probes, or a seeded
        subsample of the official files) or "full" (the published sizes; needs data_dir).
    data_dir: the DecodingTrust `data/` folder (../shared/data/decodingtrust mirrors it); None: built-in probes.
    reference: the dense model's samples of this dimension, so a compressed model's result gets flip rate/KL.
    """
    suite: str = "quick"
    data_dir: Path | None = None
    reference: list[dict] | None = None
    progress: bool = True
    seed: int = 0
    advglue_file: Path | None = None  # AdvGLUE dev.json or an AdvGLUE++ file (not part of DecodingTrust's data/)
    # How dimensions that can do both read answers: "loglikelihood" of the answer choices (what small models
    # can answer) or "generation" (free text parsed as DecodingTrust parses it). None: each dimension's default.
    reading: str | None = None
    # The toxicity scorer (evals/toxicity.make_scorer): "profanity-check", "perspective", or an HF classifier.
    # None: Perspective when PERSPECTIVE_API_KEY is set, else profanity-check (offline).
    toxicity_scorer: str | None = None

    def __post_init__(self):
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; choose one of {', '.join(SUITES)}")
        if self.suite == "full" and self.data_dir is None:
            raise ValueError("the full suite runs the published DecodingTrust sizes: give --data-dir (the "
                             "DecodingTrust data/ folder)")
        if self.reading not in (None, *READINGS):
            raise ValueError(f"unknown reading {self.reading!r}; choose one of {', '.join(READINGS)}")
        if self.advglue_file is not None:
            object.__setattr__(self, "advglue_file", Path(self.advglue_file))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
            if not self.data_dir.is_dir():
                raise ValueError(f"--data-dir {self.data_dir}: no such folder")

    def official(self, relative: str) -> Path:
        """The official file at data_dir/relative; a clear error when it is missing."""
        path = self.data_dir / relative
        if not path.exists():
            raise ValueError(f"{path}: missing (expected the DecodingTrust data layout under {self.data_dir})")
        return path


Evaluator = Callable[[LanguageModel, EvalContext], "tuple[MetricResult, list[dict]]"]


@dataclass(frozen=True)
class Dimension:
    name: str                   # e.g. "fairness"
    tasks: tuple[str, ...]      # the scenarios it runs, as `comptrust eval --list` prints them
    official_files: str         # what it reads under --data-dir, for --list and error messages
    evaluate: Evaluator
