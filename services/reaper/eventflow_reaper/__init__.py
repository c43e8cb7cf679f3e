"""eventflow_reaper service package."""
