"""Utilities for entry points (W&B, run bookkeeping)."""
