"""EventFlow: the shared package every service imports (contract, keys, settings, Redis access, NDVI)."""

__version__ = "0.1.0"
