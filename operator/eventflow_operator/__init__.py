"""eventflow_operator service package."""
