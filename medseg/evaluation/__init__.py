"""Scoring predictions against references: overlap and surface metrics, per-lesion matching and reports."""
