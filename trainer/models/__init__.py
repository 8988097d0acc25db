"""Model-family adapters (registry.get_adapter); family names appear only here and in pruning/sites.py.

Kept empty so that config validation can import ``names`` without loading open_clip or timm.
"""
