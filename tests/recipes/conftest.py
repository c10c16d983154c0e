"""Recipe tests import the recipe scripts and `rcm_recipes` from `recipes/` (pytest's `pythonpath` setting)."""
