"""Recipes: YAML files templated with Jinja2, validated with line numbers."""

from .load import load_recipe, parse_sets
from .model import Recipe, Step

__all__ = ["Recipe", "Step", "load_recipe", "parse_sets"]
