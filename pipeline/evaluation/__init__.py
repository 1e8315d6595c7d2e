"""Saliency evaluation (docs/method.md §8): baselines under one signature, metrics, the
targeted-manipulation attack, and PGD adversarial examples (`adversarial.py`, for routes under
attack). `benchmarks/saliency_eval.py` runs them; `docs/saliency_eval.md`
has the measured table.

    from pipeline.evaluation import make_method, metrics
    explain = make_method("SRD", model)                 # (images, target) -> maps [N, H, W]
    hit = metrics.pointing_game(explain(x, y), masks)   # Tensor[N]
"""
from pipeline.evaluation import metrics
from pipeline.evaluation.adversarial import PGDResult, pgd, pgd_inputs
from pipeline.evaluation.cams import cam, cam_layer
from pipeline.evaluation.explainer import Explainer, Unsupported
from pipeline.evaluation.manipulation import Attack, manipulate, smooth_copy
from pipeline.evaluation.methods import METHODS, SOURCES, batched, differentiable, make_method

__all__ = ["Attack", "Explainer", "METHODS", "PGDResult", "SOURCES", "Unsupported", "batched", "cam",
           "cam_layer", "differentiable", "make_method", "manipulate", "metrics", "pgd", "pgd_inputs",
           "smooth_copy"]
