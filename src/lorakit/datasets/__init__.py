"""Synthetic fine-tuning data sets for the demo."""
from .carrier import (
    CODE_DAMAGED, CODE_RETURN, CODE_TIER2, POLICY_CARRIER, SYSTEM_PROMPT, Pools, generate, pools, route, write,
)

__all__ = [
    "CODE_TIER2", "CODE_DAMAGED", "CODE_RETURN", "POLICY_CARRIER", "SYSTEM_PROMPT",
    "generate", "write", "route", "pools", "Pools",
]
