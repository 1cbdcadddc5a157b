"""Reproducible stepvisor benchmarks, reported as ratios against floors measured in the same run.

Run `python -m bench --help`. See bench/README.md for what is measured and how to read it.
"""
