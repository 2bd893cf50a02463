"""Trust evaluators (installed as comptrust.evals): one module per dimension, one result schema."""
from comptrust.evals.adv_robustness import evaluate_adv_robustness
from comptrust.evals.lm import LanguageModel
from comptrust.evals.machine_ethics import evaluate_machine_ethics
from comptrust.evals.perplexity import perplexity
from comptrust.evals.schema import MetricResult

# dimension name -> evaluator(lm, reference_samples, progress) -> (MetricResult, samples)
DIMENSIONS = {
    "machine_ethics": lambda lm, reference, progress: evaluate_machine_ethics(lm, reference=reference,
                                                                             progress=progress),
    "adversarial_robustness": lambda lm, reference, progress: evaluate_adv_robustness(lm, reference=reference,
                                                                                      progress=progress),
}

__all__ = ["DIMENSIONS", "LanguageModel", "MetricResult", "evaluate_adv_robustness", "evaluate_machine_ethics",
           "perplexity"]
