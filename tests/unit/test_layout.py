"""Architecture rules, checked on the source: package boundaries and the single homes of risky calls."""

from __future__ import annotations

import ast
import operator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {
    "eventflow": REPO / "src/eventflow",
    "eventflow_ingest": REPO / "services/ingest/eventflow_ingest",
    "eventflow_consumer": REPO / "services/consumer/eventflow_consumer",
    "eventflow_reaper": REPO / "services/reaper/eventflow_reaper",
    "eventflow_operator": REPO / "operator/eventflow_operator",
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def sources() -> list[tuple[str, Path]]:
    return [(pkg, p) for pkg, root in PACKAGES.items() for p in sorted(root.rglob("*.py"))]


def test_stdlib_operator_is_not_shadowed() -> None:
    assert not (REPO / "operator/__init__.py").exists()
    assert Path(operator.__file__).parent != REPO
    assert not list((REPO / "operator").glob("*.py"))
    for service in (REPO / "services").iterdir():
        assert not list(service.glob("*.py")), f"{service} must hold no top-level module"


def test_services_do_not_import_each_other_and_core_imports_no_service() -> None:
    services = set(PACKAGES) - {"eventflow"}
    for pkg, path in sources():
        bad = imports(path) & (services - {pkg})
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_heavy_dependencies_stay_in_their_home() -> None:
    for pkg, path in sources():
        used = imports(path)
        rel = path.relative_to(REPO).as_posix()
        if "rasterio" in used:
            assert rel.startswith("src/eventflow/ndvi/"), rel
        if used & {"kopf", "kubernetes"}:
            assert pkg == "eventflow_operator", rel


def test_risky_redis_calls_have_one_home() -> None:
    """XACK, FCALL and XTRIM are called only by redis/functions.py (acks must be owner-checked)."""
    for _, path in sources():
        text = path.read_text()
        rel = path.relative_to(REPO).as_posix()
        if rel == "src/eventflow/redis/functions.py":
            continue
        for call in (".xack(", ".fcall(", ".xtrim(", "maxlen=", "minid="):
            assert call not in text, f"{rel} calls {call}"


def test_no_fakeredis() -> None:
    for path in [*REPO.joinpath("tests").rglob("*.py"), *(p for _, p in sources())]:
        assert "fakeredis" not in imports(path), path
