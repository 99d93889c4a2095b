"""Planning: the DAG's keys and what must run."""

from .keys import key_of, short, why_changed
from .planner import Plan, PlannedStep, PlanError, make_plan

__all__ = ["Plan", "PlanError", "PlannedStep", "key_of", "make_plan", "short", "why_changed"]
