"""Aligner training: the scripts (extract_features.py, train_aligner.py, make_tiny_data.py) and the modules they share.

Installed as `thinkdiff_train` (see pyproject.toml), so the scripts run as `python train/train_aligner.py` in a checkout
set up with `pip install -e .`, or as the console scripts `thinkdiff-train-aligner` and friends anywhere.
"""
