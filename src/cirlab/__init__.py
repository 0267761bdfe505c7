"""cirlab: a Lightning + Hydra experiment suite for controllable image restoration."""

__version__ = "0.1.0"
