"""Training layer: process groups (parallel.py) and, built on them, the SFT/WRPO engine."""
