"""Trust evaluators (installed as comptrust.evals): one module per dimension, one result schema, one registry."""
from comptrust.evals import (adv_demonstration, adv_robustness, fairness, machine_ethics, ood_robustness, privacy,
                             stereotype, toxicity)
from comptrust.evals.lm import LanguageModel
from comptrust.evals.perplexity import perplexity
from comptrust.evals.registry import Dimension, EvalContext
from comptrust.evals.schema import MetricResult

# name -> Dimension, in DecodingTrust's order; the trust average is the mean of their scores.
DIMENSIONS = {module.DIMENSION_INFO.name: module.DIMENSION_INFO
              for module in (toxicity, stereotype, adv_robustness, ood_robustness, adv_demonstration, privacy,
                             machine_ethics, fairness)}

__all__ = ["DIMENSIONS", "Dimension", "EvalContext", "LanguageModel", "MetricResult", "perplexity"]
