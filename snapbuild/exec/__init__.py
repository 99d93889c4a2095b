"""Execution of plans, and reporters."""

from .executor import BUILT, CACHED, FAILED, SKIPPED, BuildResult, StepResult, execute

__all__ = ["BUILT", "CACHED", "FAILED", "SKIPPED", "BuildResult", "StepResult", "execute"]
