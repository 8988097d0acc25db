"""Compiled helpers, built on first use with the system C++ compiler and cached per machine.

Everything here has a NumPy/torch fallback: without a compiler (or with ``DGMR_NATIVE=0``) the
results are the same, only slower.
"""
