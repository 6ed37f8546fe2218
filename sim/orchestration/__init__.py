"""Orchestration: the runner, the round loop (engine), sweeps, tuning, reports and the Ray cluster.

It sits above the algorithm API, the plug-ins and the actors, and only the CLI and the Python
API (sim.api) import it; the floor modules of `sim` never do (tests/test_layers.py).
"""
