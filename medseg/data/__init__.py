"""Datasets: discovery, splitting and checks."""

from medseg.data.datasets import (
    Case,
    dataset_cases,
    discover_msd,
    load_datalist,
    split_cases,
)

__all__ = ["Case", "dataset_cases", "discover_msd", "load_datalist", "split_cases"]
