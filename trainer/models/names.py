"""Known family names, importable without loading any model library (config validation)."""

FAMILIES = ("open_clip", "timm")
