"""Evaluation: task accuracy on held-out rows, regression on general ability, and the verdict report."""
from .regression import GENERAL_PROMPTS, RegressionResult, general_text, perplexity, regression_eval, render_chat
from .report import Thresholds, verdict, write_report
from .task import TaskResult, generate, normalize, task_eval, wilson_interval

__all__ = [
    "task_eval", "TaskResult", "generate", "normalize", "wilson_interval",
    "regression_eval", "RegressionResult", "perplexity", "general_text", "render_chat", "GENERAL_PROMPTS",
    "Thresholds", "verdict", "write_report",
]
