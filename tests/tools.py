"""Where the suite finds external tools (helm, promtool, amtool): env override, the CI cache, PATH.

With ``CI=true`` a missing tool fails the test (CI installs them); elsewhere it skips with the reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

#: Pinned versions; .ci/run builds helm at this version into the cache below.
HELM_VERSION = "v3.16.3"
CACHE = Path(os.environ.get("EVENTFLOW_CACHE", Path.home() / ".cache/eventflow"))


def tool(name: str) -> str:
    """Path of an external tool, or fail (CI) / skip (elsewhere) naming how to get it."""
    override = os.environ.get(f"EVENTFLOW_{name.upper()}")
    candidates = [override] if override else []
    if name == "helm":
        candidates.append(str(CACHE / f"tools/helm-{HELM_VERSION}/helm"))
    found = next((c for c in candidates if c and Path(c).is_file()), None) or shutil.which(name)
    if found:
        return found
    reason = f"{name} not found (set EVENTFLOW_{name.upper()}, or run .ci/run which installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)
