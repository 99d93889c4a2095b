"""The node-side runner. It imports no build-side module (recipes, planner, executor,
click, jinja2, networkx, pydantic): inference nodes install only the base package."""
