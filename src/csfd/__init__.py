"""Cervical spine fracture detection for the RSNA 2022 Kaggle competition."""

__version__ = "0.1.0"
