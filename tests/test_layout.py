"""The shape, checkable: the README's layout block matches the tree, and the
protocol and crypto packages import with gRPC and protobuf blocked."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import vfl.common.crypto
import vfl.common.protocol

ROOT = Path(__file__).resolve().parent.parent


def layout_paths() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [m.group(1) for m in re.finditer(r"^(\S+/)\s", block, re.MULTILINE)]


def test_every_folder_in_the_readme_layout_exists() -> None:
    paths = layout_paths()
    assert len(paths) >= 10, paths
    missing = [p for p in paths if not (ROOT / p).is_dir()]
    assert not missing, f"README layout names folders that do not exist: {missing}"


def test_every_package_under_vfl_is_in_the_readme_layout() -> None:
    listed = set(layout_paths())
    packages = {
        f"{p.parent.relative_to(ROOT)}/"
        for p in (ROOT / "vfl").rglob("__init__.py")
        if "__pycache__" not in p.parts and p.parent != ROOT / "vfl"
    }
    # A package is listed on its own line, or is a folder of listed ones (vfl/services/).
    unlisted = sorted(p for p in packages if not any(x.startswith(p) for x in listed))
    assert not unlisted, f"packages missing from README's layout block: {unlisted}"
    top = {p.name + "/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for name in ("protos/", "tests/", "benchmarks/", "docs/"):
        assert name in top and any(x.startswith(name) for x in listed), name


def test_nothing_importable_outside_the_vfl_namespace() -> None:
    # The old top-level names must not come back as packages beside vfl/.
    for name in ("common", "services", "cli"):
        assert not (ROOT / name / "__init__.py").exists(), name


def test_protocol_and_crypto_import_with_grpc_blocked() -> None:
    modules = [
        m.name
        for pkg in (vfl.common.protocol, vfl.common.crypto)
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
    ] + ["vfl.common.errors", "vfl.common.psi", "vfl.common.jobconfig"]
    assert "vfl.common.protocol.steps" in modules and "vfl.common.crypto.backend" in modules
    # None in sys.modules makes `import grpc` raise ImportError, whoever tries.
    code = (
        "import sys, importlib\n"
        "for name in ('grpc', 'grpc_health', 'grpc_reflection', 'google', 'google.protobuf'):\n"
        "    sys.modules[name] = None\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "assert not any(k.startswith('vfl.v1') for k in sys.modules), 'generated wire code imported'\n"
        "print('ok', len(sys.argv))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
