"""Known engine names, importable without loading any engine library (config validation)."""

ENGINES = ("single", "fsdp", "deepspeed")
