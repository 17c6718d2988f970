"""The layers of docs/architecture.md, "Layers", kept true: which package may import which.

Every module under proxy/ is parsed with ``ast`` (nothing is imported), and each import of a ``proxy`` module,
at the top, inside a function or under ``TYPE_CHECKING``, is an edge from the importing module's package to the
imported one's. The edges must stay inside ``ALLOWED``, and ``ALLOWED`` itself only points down ``ORDER``, so the
packages form a stack with no cycle. The pure packages import no runtime at all, pyOpenSSL's private binding is
reached only from the TLS engine's seam, and the document's package tree and the references in comments name
what exists.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROXY = REPO / "proxy"
ARCHITECTURE = REPO / "docs" / "architecture.md"

# Bottom to top. "proxy" is the package's own __init__ (the version); "cli" is proxy/cli.py and proxy/__main__.py.
ORDER = ("proxy", "policy", "protocol", "config", "net", "tls", "ops", "relay", "daemon", "dev", "cli")

# What each package may import, besides itself. Adding an edge here is a design decision: it must point down ORDER.
ALLOWED: dict[str, frozenset[str]] = {
    "proxy": frozenset(),
    "policy": frozenset(),
    "protocol": frozenset({"policy"}),
    "config": frozenset({"policy", "protocol"}),  # allow patterns compiled, HeaderPolicy checked, at load time
    "net": frozenset({"config"}),  # backend addresses
    "tls": frozenset({"policy", "config", "net"}),
    "ops": frozenset({"proxy", "config", "net", "tls"}),  # failure reasons as labels; the admin server accepts
    "relay": frozenset({"policy", "protocol", "config", "net", "tls", "ops"}),
    "daemon": frozenset({"proxy", "config", "net", "tls", "ops", "relay"}),
    "dev": frozenset({"config", "ops", "daemon"}),
    "cli": frozenset({"proxy", "config", "ops", "daemon", "dev"}),
}

# Pure: no I/O runtime, no sockets, no TLS engine, no metrics registry. Tested with plain values.
PURE = ("policy", "protocol", "config")
RUNTIME_MODULES = frozenset({
    "trio", "socket", "ssl", "select", "selectors", "asyncio", "signal", "threading", "multiprocessing",
    "subprocess", "OpenSSL", "prometheus_client",
})
RUNTIME_PACKAGES = frozenset({"net", "tls", "ops", "relay", "daemon", "dev", "cli"})

# pyOpenSSL's private cffi binding and the private attributes of its objects. Reached only from the TLS engine's
# seams: its modules whose names start with an underscore (proxy/tls/_openssl.py), where the binding is typed.
PRIVATE_BINDING = "OpenSSL._util"
PRIVATE_ATTRIBUTES = frozenset({
    "_ssl", "_into_ssl", "_from_ssl", "_reverse_mapping", "_from_raw_x509_ptr", "_raise_ssl_error",
    "_NoOverlappingProtocols",
})
# Modules that read the binding without being a seam, and why; each should move its use into the seam.
BINDING_EXCEPTIONS: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. proxy.tls.context
    target: str  # the imported module, or for ``from a import b`` the module a.b when that is one
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The layer a proxy module belongs to."""
    parts = module.split(".")
    if parts == ["proxy"]:
        return "proxy"
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1]


def proxy_modules() -> list[Path]:
    return sorted(PROXY.rglob("*.py"))


@functools.cache
def known_modules() -> frozenset[str]:
    return frozenset(module_name(path) for path in proxy_modules())


def imports_of(path: Path) -> Iterator[Import]:
    return imports_in(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, *, is_package: bool = False) -> Iterator[Import]:
    """Every import in ``source``, the text of ``module``, wherever it sits in the file."""
    modules = known_modules()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield Import(module, candidate if candidate in modules else base, node.lineno)


def all_imports() -> list[Import]:
    return [imp for path in proxy_modules() for imp in imports_of(path)]


def is_proxy(target: str) -> bool:
    return target == "proxy" or target.startswith("proxy.")


def top(target: str) -> str:
    return target.split(".")[0]


# ---- the table itself ------------------------------------------------------------------------------------------


def test_the_table_names_every_package_and_points_only_down() -> None:
    assert set(ALLOWED) == set(ORDER)
    for package, allowed in ALLOWED.items():
        for dependency in allowed:
            assert ORDER.index(dependency) < ORDER.index(package), f"{package} -> {dependency} points up"


def test_every_package_under_proxy_is_in_the_order() -> None:
    packages = {package_of(module_name(path)) for path in proxy_modules()}
    assert packages == set(ORDER)


# ---- the code against the table ----------------------------------------------------------------------------------


def test_imports_between_packages_follow_the_table() -> None:
    wrong = [
        f"{imp.module} (line {imp.line}) imports {imp.target}: {package_of(imp.module)} -> {package_of(imp.target)}"
        for imp in all_imports()
        if is_proxy(imp.target)
        and package_of(imp.target) != package_of(imp.module)
        and package_of(imp.target) not in ALLOWED[package_of(imp.module)]
    ]
    assert wrong == []


def test_every_imported_proxy_module_exists() -> None:
    # A typo or a moved module would otherwise escape the table (its package name would still look right).
    modules = known_modules()
    missing = [f"{imp.module} (line {imp.line}) imports {imp.target}"
               for imp in all_imports() if is_proxy(imp.target) and imp.target not in modules]
    assert missing == []


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_import_no_runtime(package: str) -> None:
    found = [
        f"{imp.module} (line {imp.line}) imports {imp.target}"
        for imp in all_imports()
        if package_of(imp.module) == package and _is_runtime(imp.target)
    ]
    assert found == []


def _is_runtime(target: str) -> bool:
    if is_proxy(target):
        return package_of(target) in RUNTIME_PACKAGES
    return top(target) in RUNTIME_MODULES


def _is_seam(module: str) -> bool:
    return module.startswith("proxy.tls._")


def test_pyopenssl_private_binding_only_in_the_seam() -> None:
    readers = {imp.module for imp in all_imports()
               if imp.target == PRIVATE_BINDING or imp.target.startswith(PRIVATE_BINDING + ".")}
    assert any(_is_seam(module) for module in readers), "the seam no longer reads the binding: update this test"
    assert {module for module in readers if not _is_seam(module)} <= set(BINDING_EXCEPTIONS)


def test_pyopenssl_private_attributes_only_in_the_seam() -> None:
    found = []
    for path in proxy_modules():
        module = module_name(path)
        if _is_seam(module):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
                found.append(f"{module} (line {node.lineno}): .{node.attr}")
    assert found == []


def test_the_root_package_imports_nothing_of_its_own() -> None:
    own = [imp.target for imp in imports_of(PROXY / "__init__.py") if is_proxy(imp.target)]
    assert own == []


# ---- the checker finds what it must ------------------------------------------------------------------------------


def test_the_import_walk_sees_function_level_relative_and_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from proxy.daemon.server import Proxy\n"
        "def f():\n"
        "    import trio\n"
        "    from . import allow\n"
        "    from ..tls import context\n"
        "    from proxy.config import schema as cfg\n"
        "    from proxy import __version__\n"
    )
    found = {(imp.target, imp.line) for imp in imports_in(source, "proxy.policy.probe")}
    assert found >= {("proxy.daemon.server", 3), ("trio", 5), ("proxy.policy.allow", 6), ("proxy.tls.context", 7),
                     ("proxy.config.schema", 8), ("proxy", 9)}
    # and the table would refuse the upward ones
    wrong = {package_of(target) for target, _ in found if is_proxy(target)} - ALLOWED["policy"] - {"policy"}
    assert wrong == {"daemon", "tls", "config", "proxy"}


# ---- docs/architecture.md ------------------------------------------------------------------------------------------


def _headings(markdown: str) -> set[str]:
    return {match.group(1).strip() for match in re.finditer(r"^#{1,6} +(.+?) *#*$", markdown, re.M)}


def _package_tree(markdown: str) -> list[str]:
    """The entries of the fenced block that starts with ``proxy/``."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", markdown, re.S):
        lines = block.splitlines()
        if lines and lines[0].split()[0] == "proxy/":
            return [line.split()[0] for line in lines[1:] if line.strip()]
    raise AssertionError("docs/architecture.md has no package tree (a fenced block starting with proxy/)")


def test_the_architecture_document_has_the_sections_others_cite() -> None:
    sections = {"Data flow", "Layers", "TLS engine", "Threads and workers", "Reload", "Drain", "Data plane"}
    assert sections <= _headings(ARCHITECTURE.read_text())


def test_the_package_tree_lists_exactly_the_packages_that_exist() -> None:
    listed = [entry for entry in _package_tree(ARCHITECTURE.read_text()) if entry.endswith("/")]
    existing = sorted(f"{path.parent.name}/" for path in PROXY.glob("*/__init__.py"))
    assert sorted(listed) == existing
    assert len(listed) == len(set(listed))


def test_the_package_tree_lists_the_packages_in_layer_order() -> None:
    listed = [entry.rstrip("/") for entry in _package_tree(ARCHITECTURE.read_text()) if entry.endswith("/")]
    assert listed == [package for package in ORDER if package in listed]


# ---- references in the code point at something that exists -------------------------------------------------------

# Files that live outside the repository and were once cited from it.
GONE = re.compile(r"DESIGN\.md|STYLE\.md|research/|anchors\.md|tls-engine\.md|\bhabit \d+\b")
# "path/to/file.md, "Section"", also across a line break inside a comment.
CITATION = re.compile(r"([\w./-]+\.md),\s*(?:#\s*)?\"([^\"\n]+)\"")


def _cited_files() -> list[Path]:
    files = [*PROXY.rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "bench").rglob("*.py")]
    files += [*REPO.glob("*.md"), *(REPO / "docs").rglob("*.md"), *(REPO / "bench").glob("*.md"),
              *(REPO / "deploy").rglob("*.md")]
    return sorted(path for path in files if path != Path(__file__).resolve())


def test_no_reference_to_files_outside_the_repository() -> None:
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in _cited_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if GONE.search(line)
    ]
    assert found == []


def test_cited_sections_exist() -> None:
    missing = []
    for path in _cited_files():
        for match in CITATION.finditer(path.read_text()):
            target, section = REPO / match.group(1), match.group(2)
            if not target.is_file() or section not in _headings(target.read_text()):
                missing.append(f"{path.relative_to(REPO)}: {match.group(1)}, \"{section}\"")
    assert missing == []


def test_the_citation_pattern_reads_a_citation_broken_across_comment_lines() -> None:
    text = '# measured (bench/README.md,\n# "Memory after a burst")'
    assert CITATION.findall(text) == [("bench/README.md", "Memory after a burst")]
