"""The command-line package: imports point one way (the package root -> commands -> shared helpers),
and the admin and chat commands start without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CLI_DIR = Path(__file__).resolve().parents[1] / "lorax_lite" / "cli"
ROOT = "lorax_lite.cli"
# What each module may import from the package; the root (__init__) imports the commands and
# __main__ imports the root, since `python -m lorax_lite.cli` runs it.
COMMANDS = ("adapters", "chat", "generate", "keys", "serve")
ALLOWED = {"common": set(), "options": {"common"}, **dict.fromkeys(COMMANDS, {"common", "options"})}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` (a file of the package) imports; `from m import x` counts as m and m.x (x may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            package = ROOT.split(".")[: 3 - node.level] if node.level else []  # relative to lorax_lite.cli
            base = ".".join([*package, *([node.module] if node.module else [])])
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_the_module_list_is_complete() -> None:
    assert {p.stem for p in CLI_DIR.glob("*.py")} == {"__init__", "__main__", *ALLOWED}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_no_module_imports_the_package_root_back(module: str) -> None:
    imported = imported_modules(CLI_DIR / f"{module}.py")
    assert ROOT not in imported, f"{module}.py imports {ROOT}"
    package_modules = {name.split(".")[2] for name in imported if name.startswith(f"{ROOT}.")}
    assert package_modules <= ALLOWED[module], f"{module}.py imports {package_modules - ALLOWED[module]}"


def test_import_check_sees_imports_of_the_root(tmp_path: Path) -> None:
    sources = ("from lorax_lite.cli import fail", "import lorax_lite.cli", "from lorax_lite import cli", "from . import fail",
               "from .. import cli")
    for source in sources:
        path = tmp_path / "chat.py"
        path.write_text(source + "\n")
        assert ROOT in imported_modules(path), source


def test_admin_and_chat_commands_do_not_import_torch(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lorax_lite.cli import app\n"
        "for args in (['chat', '--help'], ['adapters', 'list', '--help'], ['generate', '--help'], ['usage', '--help'],\n"
        "             ['keys', 'create', '--tenant', 't', '--adapters', 'a', '--registry', 'sqlite:///' + sys.argv[1]]):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'lorax_lite.server') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "registry.db")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_python_m_runs_the_package() -> None:
    result = subprocess.run([sys.executable, "-m", ROOT, "adapters", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "register-units" in result.stdout
