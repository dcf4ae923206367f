"""The package names are generic: make sure they resolve to this repository, not something installed."""

from pathlib import Path

import adapters
import policies
import router

ROOT = Path(__file__).resolve().parent.parent


def test_packages_resolve_inside_the_repo() -> None:
    for pkg in (router, adapters, policies):
        assert Path(pkg.__file__).resolve().parent.parent == ROOT, pkg.__file__


def test_adapters_and_policies_import_only_model_and_errors_from_router() -> None:
    allowed = {"router.model", "router.errors"}
    for folder in ("adapters", "policies"):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                line = line.strip()
                if line.startswith(("from router", "import router")):
                    module = line.split()[1]
                    assert module in allowed, f"{path.relative_to(ROOT)} imports {module}"
