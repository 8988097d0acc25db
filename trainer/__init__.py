"""The DGMR prune-and-distill training application."""
