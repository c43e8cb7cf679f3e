"""Run the ingest service: ``python -m eventflow_ingest`` (same as ``eventflow ingest``)."""

from eventflow.cli import main

main(["ingest"])
