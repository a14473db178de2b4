"""The benchmark runner behind ``python -m flashcontrast.bench``."""
