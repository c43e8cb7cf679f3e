"""eventflow_consumer service package."""
