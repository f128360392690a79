"""Thin Hydra apps: compose config, instantiate, call library code."""
