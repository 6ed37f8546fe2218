"""Baseline methods, one module each; the algorithm registry finds them by scanning this package
(sim/plugins.py), so a new baseline is a new file here and nothing else."""
