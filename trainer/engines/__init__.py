"""Distributed engines behind one protocol (base.Engine, base.build_engine); engine names live only here.

Kept empty so that config validation can import ``names`` without loading any engine library.
"""
