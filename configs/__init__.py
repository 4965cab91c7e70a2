"""Hydra configs shipped with cliptune (YAML only)."""
