"""Data sources for the trainer: see base.BatchStream for the interface."""

from .base import Batch, BatchStream, InputSpec
from .synthetic import SyntheticStream

__all__ = ["Batch", "BatchStream", "InputSpec", "SyntheticStream"]
