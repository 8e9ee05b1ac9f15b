"""Scaling studies: the study grid (study.py), power-law fits (fit.py), plots (plots.py)."""
