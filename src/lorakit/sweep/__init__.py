"""Sweeps: train a grid of configurations, score each on held-out rows and on regression, select one."""
from .grid import AXES, POLICIES, GridError, expand, load
from .report import RULES, select
from .runner import EvalSettings, Sweep, run_sweep, sweep

__all__ = ["sweep", "run_sweep", "Sweep", "EvalSettings", "expand", "load", "GridError", "AXES", "POLICIES",
           "RULES", "select"]
