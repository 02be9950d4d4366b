"""The trust boundary and the import graph, read from the source (docs/architecture.md, "The trust boundary").

Agent-side code runs inside the untrusted agent container, on the agent image's Python (3.9+), with
nothing but the standard library: it imports nothing from the host side. The host side imports the
agent side only to act as a client of a channel or to ship the agent's files. And no module of
src/safespawn takes part in an import cycle, counting every import: at module level, inside
functions, and under `if TYPE_CHECKING:` (a cycle that only the type checker sees is still two
modules that cannot be read apart).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from support.vermin import VERMIN

from safespawn import client, wrappers
from safespawn.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "safespawn"

# Where each module runs. A new module must be placed here (test_every_module_has_a_side).
AGENT = {"client", "neutron_pm", "neutron_hook", "launcher"}  # in the agent container, Python 3.9+, stdlib
OCI_SHIM = {"ociruntime"}  # exec'd by dockerd on the host for every runc call
HOST = {
    "__init__", "adopt", "audit", "budget", "cli", "config", "engine", "errors", "files", "inbox", "install", "metrics",
    "pidfiles", "pidsignal", "policy", "readiness", "request", "rollout", "sidecar", "state", "units", "watch",
    "wrappers", "profiles/__init__", "runtime/__init__", "runtime/base", "runtime/checks", "runtime/conmon",
    "runtime/docker", "runtime/podman",
}
# The names the agent-side files have once `safespawn wrappers install` has copied them.
COPIED_AS = {"safespawn_client": "client", "safespawn_neutron": "neutron_pm"}
# Imports an agent-side module may make besides the standard library: Neutron's own packages, which
# the class plugs into (the agent image has them), imported only when Neutron asks for the class.
AGENT_EXTRA = {"neutron_pm": {"neutron", "neutron_lib", "oslo_log"}}
# The only host -> agent imports, and why each is one.
HOST_USES_AGENT = {
    ("__init__", "client"): "the facade re-exports NoBroker, which the client raises",
    ("cli", "client"): "`safespawn submit` is a client of a channel",
    ("adopt", "client"): "adopt submits start requests through the channel, as a client",
    ("wrappers", "launcher"): "`wrappers install` ships the launcher, its hook and the class",
}


def _modules() -> dict[str, Path]:
    """'runtime/podman' -> path, for every module under src/safespawn."""
    return {str(p.relative_to(SRC).with_suffix("")): p for p in sorted(SRC.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[int, str | None, str, int]]:
    """Every import in the file, wherever it is: (level, module, name, line). `import a.b` gives
    (0, None, 'a.b'); `from ..x import y` gives (2, 'x', 'y')."""
    out: list[tuple[int, str | None, str, int]] = []
    for n in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(n, ast.Import):
            out.extend((0, None, a.name, n.lineno) for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            out.extend((n.level, n.module, a.name, n.lineno) for a in n.names)
    return out


def _top_names(path: Path) -> set[str]:
    """The top-level package of every absolute import; relative imports as '.'."""
    names = set()
    for level, module, name, _ in _imports(path):
        names.add("." if level else (module or name).split(".")[0])
    return names


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Dotted module -> the modules of `package` it imports (anywhere in the file).

    Importing `package.a.b` from outside `package.a` also runs `package/a/__init__.py`: that counts
    as an edge to `package.a`. The root package itself is not counted that way: every module is
    inside it, so it is always imported first."""
    mods: dict[str, Path] = {}
    for p in root.rglob("*.py"):
        parts = [package, *p.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        targets = set()
        for level, module, name, _ in _imports(path):
            if level:
                base = ".".join(here[:len(here) - level + 1] + ([module] if module else []))
            else:
                base = module or name
            full = f"{base}.{name}" if module is not None or level else base
            targets.add(full if full in mods else base)
        edges = set()
        for t in targets:
            if t not in mods or t == mod:
                continue
            edges.add(t)
            parts = t.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in mods and not mod.startswith(parent + "."):
                    edges.add(parent)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# -- where each module runs -------------------------------------------------------------------------

def test_every_module_has_a_side() -> None:
    assert set(_modules()) == AGENT | OCI_SHIM | HOST
    assert not (AGENT & HOST or AGENT & OCI_SHIM or HOST & OCI_SHIM)


def test_the_readme_layout_names_every_module_and_says_where_the_neutron_tests_are() -> None:
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    for name in _modules():
        if name == "__init__":
            continue
        if name.endswith("/__init__"):  # a package: its folder
            assert name.removesuffix("__init__") in layout, name
        else:
            assert re.search(rf"(?<![\w-]){re.escape(name.rpartition('/')[2])}\.py", layout), name
    assert "tests/neutron" in layout or "neutron/" in layout


# -- the agent side ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(AGENT))
def test_agent_side_module_imports_only_the_standard_library_and_the_agent_side(name: str) -> None:
    path = SRC / f"{name}.py"
    allowed_safespawn = {f"safespawn.{m}" for m in AGENT} | {f".{m}" for m in AGENT}
    for level, module, imported, line in _imports(path):
        if level:  # from . import x / from .x import y: only other agent-side modules
            target = f".{module}" if module else f".{imported}"
            assert target in allowed_safespawn, f"{name}.py:{line} imports host-side {target}"
            continue
        top = (module or imported).split(".")[0]
        if top == "safespawn":
            full = f"{module}.{imported}" if module == "safespawn" else (module or imported)
            assert full in allowed_safespawn, f"{name}.py:{line} imports host-side {full}"
            continue
        assert (top in sys.stdlib_module_names or top in COPIED_AS or top in AGENT_EXTRA.get(name, set())), \
            f"{name}.py:{line} imports {top}, which an agent image need not have"


@pytest.mark.parametrize("name", sorted(AGENT))
def test_agent_side_module_parses_as_python_3_9(name: str) -> None:
    ast.parse((SRC / f"{name}.py").read_text(), feature_version=(3, 9))


def test_vermin_finds_nothing_newer_than_3_9_on_the_agent_side() -> None:
    files = [str(SRC / f"{name}.py") for name in sorted(AGENT)]
    p = subprocess.run([*VERMIN, "--target=3.9-", "--violations", "--no-tips", "--no-parse-comments", *files],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_generated_wrappers_and_launcher_import_only_the_standard_library_and_the_copies(
        tmp_path: Path) -> None:
    wrappers.install(str(tmp_path), "ch", "/var/lib/safespawn/channels/ch")
    scripts = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".py")]
    assert {p.name for p in scripts} >= set(wrappers.PROGRAMS) | set(wrappers.KILL_SCRIPTS) | {"safespawn-neutron"}
    for p in scripts:
        ast.parse(p.read_text(), feature_version=(3, 9))
        assert _top_names(p) <= set(sys.stdlib_module_names) | set(COPIED_AS), p.name


def test_the_client_restates_the_exit_codes_of_the_command_line() -> None:
    # client.py is copied alone into agent images, so it cannot import ExitCode; its values are these.
    assert (client.EXIT_OK, client.EXIT_FAILED, client.EXIT_USAGE, client.EXIT_NO_BROKER) == (
        ExitCode.OK, ExitCode.FAILED, ExitCode.USAGE, ExitCode.NO_BROKER)


# -- the host side -----------------------------------------------------------------------------------

def test_the_host_side_imports_the_agent_side_only_as_a_client_or_to_ship_it() -> None:
    graph = import_graph(SRC, "safespawn")
    agent = {f"safespawn.{m}" for m in AGENT}
    seen = set()
    for mod, targets in graph.items():
        short = mod.removeprefix("safespawn").lstrip(".").replace(".", "/") or "__init__"
        if short in AGENT:
            continue
        for t in targets & agent:
            seen.add((short, t.removeprefix("safespawn.")))
    assert seen == set(HOST_USES_AGENT)


# -- no import cycles ----------------------------------------------------------------------------------

def test_there_is_no_import_cycle_in_src_counting_type_checking_and_function_level_imports() -> None:
    graph = import_graph(SRC, "safespawn")
    assert len(graph) == len(_modules())
    assert cycles(graph) == []


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / "pkg" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


def _cycles_of(tmp_path: Path, files: dict[str, str]) -> list[list[str]]:
    return cycles(import_graph(_package(tmp_path, {"__init__.py": "", **files}), "pkg"))


def test_the_cycle_finder_sees_a_cycle_hidden_behind_type_checking(tmp_path: Path) -> None:
    found = _cycles_of(tmp_path, {
        "a.py": "from . import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import Thing\n",
    })
    assert found == [["pkg.a", "pkg.b"]]


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    found = _cycles_of(tmp_path, {"a.py": "import pkg.b\n", "b.py": "def f():\n    from pkg import a\n"})
    assert found == [["pkg.a", "pkg.b"]]


def test_the_cycle_finder_sees_a_cycle_through_a_subpackages_init(tmp_path: Path) -> None:
    # a imports sub.base, which runs sub/__init__.py, which imports sub.impl, which imports a.
    found = _cycles_of(tmp_path, {
        "a.py": "from .sub.base import X\n",
        "sub/__init__.py": "from .impl import Y\n",
        "sub/base.py": "X = 1\n",
        "sub/impl.py": "from ..a import X\nY = 2\n",
    })
    assert found == [["pkg.a", "pkg.sub", "pkg.sub.impl"]]


def test_the_cycle_finder_accepts_a_package_that_imports_its_own_modules(tmp_path: Path) -> None:
    assert _cycles_of(tmp_path, {
        "sub/__init__.py": "from .impl import Y\nfrom .base import X\n",
        "sub/base.py": "X = 1\n",
        "sub/impl.py": "from .base import X\nY = 2\n",
    }) == []


# -- docs stand on their own ---------------------------------------------------------------------------

# Built from parts so that this file does not cite them itself.
_OUTSIDE = re.compile("|".join(re.escape(s) for s in (
    "../" + "shared/", "/work/" + "shared", "DESIGN" + ".md", "TESTBED" + ".md", "STYLE" + ".md")))


def _repository_files() -> Iterable[Path]:
    """The tracked files (git), or, in a copy without git (the unprivileged unit run), every file."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, timeout=30)
    except FileNotFoundError:
        out = None
    if out is not None and out.returncode == 0 and out.stdout:
        return [REPO / n for n in out.stdout.decode().split("\0") if n]
    skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
            "site-packages"}
    return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)
            and ".egg-info" not in str(p)]


def test_no_file_of_the_repository_cites_notes_outside_it() -> None:
    files = list(_repository_files())
    names = {str(p.relative_to(REPO)) for p in files}
    # Not vacuous: the docs, scripts and tests are among the files read.
    assert {"README.md", "docs/architecture.md", "docs/testbed.md", "scripts/testbed-setup",
            "tests/unit/test_boundary.py"} <= names
    bad = []
    for p in files:
        try:
            text = p.read_text(errors="replace")
        except (OSError, UnicodeDecodeError):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                bad.append(f"{p.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert bad == []
