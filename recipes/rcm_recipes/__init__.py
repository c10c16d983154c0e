"""Shared code of the recipe scripts: config plumbing, the CPU demo's procedural data, metric and writers."""
