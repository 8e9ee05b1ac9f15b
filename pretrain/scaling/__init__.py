"""Scaling studies: the study config and grid (``study.py``), power-law fits with bootstrap
intervals and the compute frontier (``fit.py``), the table, ``fit.json`` and model-card
section (``report.py``) and the figures (``plots.py``). Running the points on a machine
or a cluster is ``launch/scale.py``'s job (only ``launch/`` knows about clusters)."""
