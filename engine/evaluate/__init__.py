"""Evaluation: the paper's downstream tasks with PCA and supervised baselines, one file per evaluator:
celltype.py (linear probe, kNN, fine-tuning), reconstruction.py, crossmodal.py, integration.py (scib-metrics);
metrics.py holds the scores, inputs.py the checked reads of a store, representations.py what is evaluated,
report.py the outputs, and suite.py runs them all (`from cellssl.engine.evaluate.suite import evaluate`)."""
from .config import TASKS, EvalConfig

__all__ = ["TASKS", "EvalConfig"]
