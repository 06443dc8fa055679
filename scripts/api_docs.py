"""Generate the API reference, ``docs/api.md``, from the docstrings of cudrop's namespaces.

    python scripts/api_docs.py          # (re)write docs/api.md
    python scripts/api_docs.py --check  # exit 1, with a short diff summary, if it is out of date

It documents the checkout it lives in (the folder above ``scripts/`` goes first on ``sys.path``),
not whichever cudrop happens to be installed.

What goes in, generic over whatever each namespace exports:

- Sections in the order of ``NAMESPACES``. A section's names are the namespace's ``__all__``; a
  namespace without ``__all__`` falls back to its public attributes, minus modules, minus
  ``from __future__`` features and minus classes/functions defined outside cudrop (helpers such
  as ``dataclass`` imported for the module's own use). Modules are skipped in either case.
- Names are sorted alphabetically (case-insensitively) within a section, not in ``__all__``
  order: the output then does not change when an ``__all__`` is reordered or built from
  ``globals()``.
- Each name: an anchor, a heading with its signature (``inspect.signature``, defaults included;
  for a class, its constructor), its docstring, and for a class its public methods and properties
  defined on the class itself (not inherited), each with its docstring.
- An object exported by several namespaces is documented once, in the first section that has it;
  the later sections link to that entry.
- Docstrings are the object's *own*: ``inspect.cleandoc(obj.__doc__)``. ``inspect.getdoc``
  would hand a class without a docstring its base class's (``Exception``'s, ``Module``'s), which
  hides the missing one; methods do use ``inspect.getdoc``, since an override documented by the
  method it overrides is fine. A constant (a tuple, a dict) cannot carry a docstring: its
  documentation is the block of ``#:`` comment lines right above its top-level assignment in the
  namespace's source (the Sphinx convention), and its value is shown.
- ``cudrop.torch`` (the PyTorch bridge) is deliberately never documented here: it imports only
  where PyTorch is installed, and this file must come out byte-identical with or without
  PyTorch so that ``--check`` and ``tests/test_docs.py`` give the same answer on every machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import pathlib
import re
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"

# (namespace, what it holds): the sections of docs/api.md, in this order.
NAMESPACES = [
    ("cudrop", "Tensor ops and the top-level API"),
    ("cudrop.functional", "ops on raw arrays, as pairs `op(...) -> (out, saved)` / `op_backward`"),
    ("cudrop.nn", "layers"),
    ("cudrop.optim", "optimizers and learning-rate schedules"),
    ("cudrop.models", "model builders"),
    ("cudrop.data", "data sets and batch iterators"),
    ("cudrop.bsmm", "block-sparse matrix products on raw arrays"),
    ("cudrop.masks", "element and block masks"),
    ("cudrop.random", "the global generator of ops called without a seed"),
    ("cudrop.graph", "whole training steps captured as CUDA graphs"),
    ("cudrop.distributed", "data-parallel training over NCCL"),
]
# Not documented, on purpose (see the module docstring): needs PyTorch.
SKIPPED = {"cudrop.torch": "it needs PyTorch, and this file must not depend on whether PyTorch "
                           "is installed; read it with `help(cudrop.torch)`"}

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# "<module 'numpy' from '/site-packages/...'>": where NumPy lives differs between machines.
_MODULE_PATH = re.compile(r" from '[^']*'>")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|const):`~?([^`]+)`")


def _ensure_path():
    if str(ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(ROOT))


# ---- what a namespace exports -----------------------------------------------------------------

def public_names(module) -> list[str]:
    """The documented names of ``module``, sorted: ``__all__`` (or the fallback), minus modules."""
    names = getattr(module, "__all__", None)
    explicit = names is not None
    if not explicit:
        names = [n for n in vars(module) if not n.startswith("_")]
    root = module.__name__.split(".")[0]
    out = []
    for name in dict.fromkeys(names):
        if not hasattr(module, name):
            raise AttributeError(f"{module.__name__}.__all__ names {name!r}, which it lacks")
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            continue
        if not explicit and _imported_helper(obj, root):
            continue
        out.append(name)
    return sorted(out, key=lambda n: (n.lower(), n))


def _imported_helper(obj, root: str) -> bool:
    if type(obj).__module__ == "__future__":
        return True
    if inspect.isclass(obj) or callable(obj):
        mod = getattr(inspect.unwrap(obj) if not inspect.isclass(obj) else obj, "__module__", None)
        return isinstance(mod, str) and mod.split(".")[0] != root
    return False


def namespace_items(modname: str):
    """[(name, object)] of a namespace, sorted; the module is imported here."""
    module = importlib.import_module(modname)
    return module, [(n, getattr(module, n)) for n in public_names(module)]


# ---- docstrings -------------------------------------------------------------------------------

def kind(obj) -> str:
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "constant"


def own_doc(obj, name: str, module) -> str:
    """The object's own docstring, cleaned ('' when it has none); see the module docstring."""
    k = kind(obj)
    if k == "class":
        doc = obj.__dict__.get("__doc__")
        if doc and dataclasses.is_dataclass(obj) and doc == _dataclass_autodoc(obj):
            doc = None  # the signature dataclasses writes in, not documentation
    elif k == "function":
        target = inspect.unwrap(obj)
        doc = getattr(target, "__doc__", None)
        if not (inspect.isroutine(target)) and doc is type(target).__doc__:
            doc = None  # a callable instance: its class's docstring is not its own
    else:
        doc = _comment_doc(name, module)
    return inspect.cleandoc(doc).strip() if isinstance(doc, str) else ""


def _dataclass_autodoc(cls) -> str | None:
    try:
        return cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
    except (TypeError, ValueError):
        return None


def _comment_doc(name: str, module) -> str | None:
    """``#:`` lines right above ``name = ...`` (or ``name: T = ...``) at the top level of the
    namespace's source files: its own file first, then, for a package, its modules in order."""
    assign = re.compile(rf"^{re.escape(name)}\s*(?::[^=]*)?=(?!=)")
    for path in _source_files(module):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if assign.match(line):
                doc = []
                j = i - 1
                while j >= 0 and lines[j].lstrip().startswith("#:"):
                    doc.append(lines[j].lstrip()[2:].strip())
                    j -= 1
                if doc:
                    return "\n".join(reversed(doc))
    return None


def _source_files(module) -> list[pathlib.Path]:
    f = getattr(module, "__file__", None)
    if not f:
        return []
    first = pathlib.Path(f)
    files = [first]
    if first.name == "__init__.py":  # a package: any of its modules may define the constant
        pkg = first.parent
        files += sorted(p for p in pkg.rglob("*.py") if p != first)
    return files


def method_doc(obj) -> str:
    return inspect.getdoc(obj) or ""


# ---- rendering ----------------------------------------------------------------------------------

def signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = "(...)"
    return _MODULE_PATH.sub(">", _ADDRESS.sub("", sig))


def _value(obj) -> str:
    text = _ADDRESS.sub("", repr(obj))
    return text if len(text) <= 300 else text[:297] + "..."


def anchor(qualname: str) -> str:
    # The qualified name itself: unique (``cudrop.Tensor`` and ``cudrop.tensor`` both exist, so
    # no lower-casing) and readable in a link.
    return qualname


def _markdown(doc: str) -> str:
    # Sphinx roles read as code; a line starting with '#' would become a heading.
    doc = _ROLE.sub(r"`\1`", doc)
    return "\n".join("\\" + ln if ln.startswith("#") else ln for ln in doc.splitlines())


def class_members(cls):
    """(name, kind, object) of the public methods and properties defined on ``cls`` itself."""
    out = []
    for name, raw in sorted(vars(cls).items(), key=lambda kv: (kv[0].lower(), kv[0])):
        if name.startswith("_"):
            continue
        if isinstance(raw, property):
            out.append((name, "property", raw))
        elif isinstance(raw, (staticmethod, classmethod)):
            out.append((name, type(raw).__name__, getattr(cls, name)))
        elif inspect.isfunction(raw) or inspect.ismethoddescriptor(raw):
            out.append((name, "method", raw))
    return out


def _entry(qual: str, name: str, obj, module) -> list[str]:
    k = kind(obj)
    out = [f'<a id="{anchor(qual)}"></a>', ""]
    if k == "constant":
        out += [f"### `{qual}`", "", f"*constant* = `{_value(obj)}`"]
    else:
        out += [f"### `{qual}{signature(obj)}`", "", f"*{k}*"]
    doc = own_doc(obj, name, module)
    out += ["", _markdown(doc) if doc else "*(no docstring)*", ""]
    if k == "class":
        for mname, mkind, m in class_members(obj):
            target = m.fget if mkind == "property" else m
            sig = "" if mkind == "property" else signature(m)
            if mkind == "method" and sig.startswith("(self, "):
                sig = "(" + sig[len("(self, "):]
            elif mkind == "method" and sig == "(self)":
                sig = "()"
            out += [f"#### `{name}.{mname}{sig}`" + (f" *({mkind})*" if mkind != "method" else ""),
                    ""]
            mdoc = method_doc(target) if target is not None else ""
            out += [_markdown(mdoc) if mdoc else "*(no docstring)*", ""]
    return out


def generate() -> str:
    """The whole of docs/api.md, as a string."""
    _ensure_path()
    sections = []
    first_seen: dict = {}  # identity key -> qualified name of the documenting entry
    for modname, blurb in NAMESPACES:
        module, items = namespace_items(modname)
        body = []
        for name, obj in items:
            qual = f"{modname}.{name}"
            key = id(obj) if kind(obj) != "constant" else (name, id(obj))
            if key in first_seen:
                home = first_seen[key]
                body += [f'<a id="{anchor(qual)}"></a>', "", f"### `{qual}`", "",
                         f"Same object as [`{home}`](#{anchor(home)}).", ""]
                continue
            first_seen[key] = qual
            body += _entry(qual, name, obj, module)
        sections.append((modname, blurb, items, body))

    out = ["# cudrop API reference", "",
           "Generated from the docstrings by `python scripts/api_docs.py`; do not edit by hand "
           "(`python scripts/api_docs.py --check` tells whether it is current). Names are sorted "
           "alphabetically within each section; an object exported by several namespaces is "
           "documented in the first section that has it and linked from the others.", ""]
    for mod, why in SKIPPED.items():
        out += [f"`{mod}` is not documented here: {why}.", ""]
    out += ["## Contents", ""]
    for modname, blurb, items, _ in sections:
        out.append(f"- [`{modname}`](#{anchor(modname)}): {blurb} ({len(items)} names)")
    out.append("")
    for modname, blurb, items, body in sections:
        out += [f'<a id="{anchor(modname)}"></a>', "", f"## `{modname}`", "", f"{blurb[0].upper()}"
                f"{blurb[1:]}.", ""]
        if items:
            out += [", ".join(f"[`{n}`](#{anchor(modname + '.' + n)})" for n, _ in items), ""]
        else:
            out += ["*(exports no public names)*", ""]
        out += body
    return "\n".join(out).rstrip("\n") + "\n"


def diff_summary(old: str, new: str, limit: int = 20) -> str:
    """A short account of how ``old`` (the file) differs from ``new`` (generated)."""
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), "docs/api.md (file)",
                                      "docs/api.md (generated)", n=0, lineterm=""))
    changed = [ln for ln in lines[2:] if ln[:1] in "+-"]
    head = [ln for ln in lines if not ln.startswith("@@")][:limit + 2]
    more = len(changed) - (len(head) - 2)
    text = "\n".join(head)
    if more > 0:
        text += f"\n... and {more} more changed lines"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 with a diff summary if docs/api.md is out of date; write nothing")
    args = ap.parse_args(argv)
    new = generate()
    if args.check:
        old = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if old == new:
            print("docs/api.md is up to date")
            return 0
        print("docs/api.md is out of date; run `python scripts/api_docs.py`\n"
              + (diff_summary(old, new) if old else "(docs/api.md does not exist)"))
        return 1
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(new, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
