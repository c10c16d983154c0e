"""Recipe tests import the shared recipe package `rcm_recipes` from `recipes/` (scripts are not installed)."""

import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))
