"""Scoring trained checkpoints: ``grid`` (task-vector grids through ``trainer.test``) and
``levels`` (HyperRes scalar-level sweeps)."""
