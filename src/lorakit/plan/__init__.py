"""Planning: parameter and memory arithmetic before renting hardware."""
from .memory import lora_params, matrix_plan, model_states, rank_table, tenant_storage
from .report import PlanConfig, plan_model, plan_params

__all__ = ["lora_params", "matrix_plan", "model_states", "rank_table", "tenant_storage", "plan_model", "plan_params", "PlanConfig"]
