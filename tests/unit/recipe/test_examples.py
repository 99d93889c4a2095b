"""Every example recipe loads: templating, the schema of each step, references and the
links between steps (planning them needs CRIU and their sources; the integration
tests and benchmarks build them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapbuild.recipe.load import load_recipe

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
EXAMPLES = sorted(p for p in (*RECIPES.glob("examples/*.yaml"), *RECIPES.glob("gpu/*.yaml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_an_example_recipe_loads(path):
    recipes = load_recipe(path)
    assert recipes and all(r.steps for r in recipes)
    for r in recipes:
        for step in r.steps.values():
            if step.kind.name == "checkpoint":
                for check in step.spec.verify:
                    assert check.http and check.http.split()[-1].startswith("/"), check


def test_the_examples_are_found():
    names = {p.name for p in EXAMPLES}
    assert {"uvicorn-transformers.yaml", "torch-mp-workers.yaml", "vllm-b200.yaml"} <= names
