"""The trust boundary and the import graph, read from the source (docs/architecture.md, "The trust boundary").

Each folder of src/safespawn is one side. agent/ runs inside the untrusted agent container, on the
agent image's Python (3.9+), with nothing but the standard library: it imports nothing from the host
side. The host side (broker/, runtime/, ops/ and the top-level modules) imports the agent side only
to act as a client of a channel or to ship the agent's files, and each host folder imports only
what the layering below allows. And no module of src/safespawn takes part in an import cycle,
counting every import: at module level, inside functions, and under `if TYPE_CHECKING:` (a cycle
that only the type checker sees is still two modules that cannot be read apart).
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

from safespawn.agent import client
from safespawn.errors import ExitCode
from safespawn.ops import wrappers

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "safespawn"

# Where each module runs: its folder says it. A module outside these folders must be one of TOP.
SIDES = {
    "agent": "in the agent container (untrusted), Python 3.9+, standard library only",
    "broker": "root on the host: reads the channel, decides, acts, replies",
    "runtime": "root on the host: the podman and docker CLIs, and the OCI shim dockerd execs",
    "ops": "root on the host: the operator's commands (install, units, wrappers, adopt, doctor)",
}
TOP = {"__init__", "cli", "config", "errors"}  # host: the public names, the command, what every host side reads
OCI_SHIM = "runtime/ociruntime"  # exec'd by dockerd for every runc call: cheap to import (test_docker_runtime)
# What each host module may import of safespawn, by folder or module (a folder allows its modules).
# The broker drives the runtimes; the runtimes use the broker's values (the spec and container,
# budgets, the pid-file reader, and, in the OCI shim, the policy's netns checks), never the engine;
# ops and the command line sit on top; nothing but cli.py imports ops/.
MAY_IMPORT = {
    "errors": set(),
    "config": {"broker/budget", "errors"},
    "broker": {"broker", "runtime", "config", "errors"},
    "runtime": {"runtime", "broker/sidecar", "broker/budget", "broker/pidfiles", "broker/policy", "config", "errors"},
    "ops": {"ops", "broker", "runtime", "agent/client", "agent/scripts", "config", "errors"},
    "cli": {"agent/client", "broker", "runtime", "ops", "config", "errors"},
    "__init__": {"agent/client", "broker", "runtime", "config", "errors"},
}
# The names the agent-side files have once `safespawn wrappers install` has copied them.
COPIED_AS = {"safespawn_client": "agent/client", "safespawn_neutron": "agent/neutron_pm"}
# Imports an agent-side module may make besides the standard library: Neutron's own packages, which
# the class plugs into (the agent image has them), imported only when Neutron asks for the class.
AGENT_EXTRA = {"agent/neutron_pm": {"neutron", "neutron_lib", "oslo_log"}}
# The only host -> agent imports, and why each is one.
HOST_USES_AGENT = {
    ("__init__", "agent/client"): "the facade re-exports NoBroker, which the client raises",
    ("cli", "agent/client"): "`safespawn submit` is a client of a channel",
    ("ops/adopt", "agent/client"): "adopt submits start requests through the channel, as a client",
    ("ops/wrappers", "agent/scripts"): "`wrappers install` ships the agent side: the scripts, the client, the class and its hook",
}


def _side(name: str) -> str:
    """'broker/engine' -> 'broker'; a top-level module is its own side ('cli')."""
    return name.partition("/")[0]


def _agent_modules() -> list[str]:
    return sorted(n for n in _modules() if _side(n) == "agent")


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
                if parent in mods and parent != mod and not mod.startswith(parent + "."):
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

def _short(dotted: str) -> str:
    """'safespawn.broker.engine' -> 'broker/engine'; the package itself (or a folder's) -> its __init__."""
    name = dotted.removeprefix("safespawn").lstrip(".").replace(".", "/")
    return name if name in _modules() else f"{name}/__init__".lstrip("/")


def test_every_module_has_a_side() -> None:
    for name in _modules():
        assert _side(name) in SIDES or name in TOP, f"{name}.py is in no side's folder"
    assert set(SIDES) <= {_side(n) for n in _modules()}
    assert OCI_SHIM in _modules()


def test_the_readme_layout_names_every_module_and_says_where_the_neutron_tests_are() -> None:
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    for name in _modules():
        if name == "__init__":
            continue
        if name.endswith("/__init__"):  # a package: its folder
            assert name.removesuffix("__init__").rpartition("/")[0].rpartition("/")[2] + "/" in layout, name
        else:
            assert re.search(rf"(?<![\w-]){re.escape(name.rpartition('/')[2])}\.py", layout), name
    assert "tests/neutron" in layout or "neutron/" in layout


# -- the agent side ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", _agent_modules())
def test_agent_side_module_imports_only_the_standard_library_and_the_agent_side(name: str) -> None:
    graph = import_graph(SRC, "safespawn")
    host = {_short(t) for t in graph[f"safespawn.{name.replace('/', '.')}".removesuffix(".__init__")]}
    assert {t for t in host if _side(t) != "agent"} == set(), f"{name}.py imports the host side"
    for level, module, imported, line in _imports(SRC / f"{name}.py"):
        if level:
            continue  # inside the package: the graph above
        top = (module or imported).split(".")[0]
        if top == "safespawn":
            full = f"{module}.{imported}" if module else imported
            target = _short(full) if _short(full) in _modules() else _short(module or full)
            assert _side(target) == "agent", f"{name}.py:{line} imports host-side {full}"
            continue
        assert (top in sys.stdlib_module_names or top in COPIED_AS or top in AGENT_EXTRA.get(name, set())), \
            f"{name}.py:{line} imports {top}, which an agent image need not have"


@pytest.mark.parametrize("name", _agent_modules())
def test_agent_side_module_parses_as_python_3_9(name: str) -> None:
    ast.parse((SRC / f"{name}.py").read_text(), feature_version=(3, 9))


def test_vermin_finds_nothing_newer_than_3_9_on_the_agent_side() -> None:
    files = [str(SRC / f"{name}.py") for name in _agent_modules()]
    p = subprocess.run([*VERMIN, "--target=3.9-", "--violations", "--no-tips", "--no-parse-comments", *files],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_agent_side_checks_see_a_host_import_and_a_newer_python(tmp_path: Path) -> None:
    # The checks above are only as good as what they look at: a host import, relative or absolute,
    # shows up in the graph, and a 3.10 construct does not parse as 3.9.
    graph = import_graph(_package(tmp_path, {
        "__init__.py": "", "errors.py": "", "agent/__init__.py": "", "agent/a.py": "from ..errors import X\n",
        "agent/b.py": "def f():\n    import pkg.errors\n"}), "pkg")
    assert graph["pkg.agent.a"] == {"pkg.errors"} and graph["pkg.agent.b"] == {"pkg.errors"}
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))


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
    seen = set()
    for mod, targets in graph.items():
        short = _short(mod)
        if _side(short) == "agent":
            continue
        for t in targets:
            if _side(_short(t)) == "agent" and _short(t) != "agent/__init__":
                seen.add((short, _short(t)))
    assert seen == set(HOST_USES_AGENT)


def _allowed(importer: str, target: str) -> bool:
    rules = MAY_IMPORT[importer if importer in MAY_IMPORT else _side(importer)]
    if target.endswith("/__init__"):  # a folder's __init__ runs with any module of it
        return any(r == target.removesuffix("/__init__") or r.startswith(target.removesuffix("__init__"))
                   for r in rules)
    return any(target == r or _side(target) == r for r in rules)


def test_each_host_folder_imports_only_what_the_layering_allows() -> None:
    graph = import_graph(SRC, "safespawn")
    bad = []
    for mod, targets in sorted(graph.items()):
        short = _short(mod)
        if _side(short) == "agent":
            continue
        bad += [f"{short} -> {_short(t)}" for t in sorted(targets) if not _allowed(short, _short(t))]
    assert bad == []


def test_the_layering_check_sees_the_broker_importing_ops() -> None:
    assert not _allowed("broker/engine", "ops/install")
    assert not _allowed("runtime/podman", "broker/engine")
    assert not _allowed("errors", "agent/client")
    assert _allowed("runtime/docker", "broker/__init__") and _allowed("broker/engine", "runtime/__init__")


def test_the_oci_shim_imports_only_the_standard_library_at_module_level() -> None:
    # dockerd execs it for every runc call; only a `create` that names a netns reads the config
    # and the profile (inside functions).
    tree = ast.parse((SRC / f"{OCI_SHIM}.py").read_text())
    for n in tree.body:
        if isinstance(n, ast.Import):
            tops = {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            tops = {"." if n.level else (n.module or "").split(".")[0]}
        else:
            continue
        assert tops <= set(sys.stdlib_module_names), ast.unparse(n)


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
