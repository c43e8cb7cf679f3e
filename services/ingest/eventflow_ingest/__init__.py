"""eventflow_ingest service package."""
