"""Documentation checks (CPU, fast):

(a) every public name of the documented namespaces has a docstring of its own;
(b) docs/api.md is what ``scripts/api_docs.py`` generates now;
(c) every ```python block of README.md runs as written, on NumPy, in order in one namespace
    (a block whose first line is ``# gpu`` is skipped, and its test id says it is GPU-only).

The namespaces and the notion of "public name" are the generator's (``scripts/api_docs.py``),
so the tests follow whatever the namespaces export.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import signal
import sys
import traceback
import types

import pytest

from cudrop import backend

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Per README block, in seconds: generous for a 2-core CPU, short enough to keep examples small.
README_BLOCK_TIMEOUT = float(os.environ.get("CUDROP_README_TIMEOUT", "60"))


def _load_generator():
    spec = importlib.util.spec_from_file_location("cudrop_api_docs", ROOT / "scripts" / "api_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


api_docs = _load_generator()


# ---- (a) docstrings ------------------------------------------------------------------------------

def test_every_public_name_has_a_docstring():
    missing = []
    for modname, _ in api_docs.NAMESPACES:
        module, items = api_docs.namespace_items(modname)
        for name, obj in items:
            if not api_docs.own_doc(obj, name, module):
                where = getattr(obj, "__module__", None) if api_docs.kind(obj) != "constant" else None
                missing.append(f"{modname}.{name} ({api_docs.kind(obj)}"
                               + (f", defined in {where}" if where and where != modname else "")
                               + ")")
    if missing:
        pytest.fail(f"{len(missing)} public names lack a docstring (for a constant: '#:' comment "
                    "lines right above its assignment):\n  " + "\n  ".join(missing), pytrace=False)


# ---- (b) docs/api.md is current ------------------------------------------------------------------

def test_api_md_is_up_to_date():
    new = api_docs.generate()
    old = api_docs.OUTPUT.read_text(encoding="utf-8") if api_docs.OUTPUT.exists() else ""
    if old != new:
        pytest.fail("docs/api.md is out of date: run `python scripts/api_docs.py` and commit it.\n"
                    + (api_docs.diff_summary(old, new) if old else "(docs/api.md is missing)"),
                    pytrace=False)


def test_generator_links_reexports_to_their_first_entry(monkeypatch):
    """An object exported by two namespaces is documented once and linked from the second."""
    from cudrop import optim
    fake = types.ModuleType("cudrop_fake_ns")
    fake.SGD = optim.SGD

    def own(x=1):
        """Documented here."""

    own.__module__ = "cudrop_fake_ns"
    fake.own = own
    fake.__all__ = ["SGD", "own"]
    monkeypatch.setitem(sys.modules, "cudrop_fake_ns", fake)
    monkeypatch.setattr(api_docs, "NAMESPACES", [("cudrop.optim", "optimizers"),
                                                  ("cudrop_fake_ns", "a fake namespace")])
    text = api_docs.generate()
    assert text.count("### `cudrop.optim.SGD(") == 1
    assert "### `cudrop_fake_ns.SGD`\n\nSame object as [`cudrop.optim.SGD`](#cudrop.optim.SGD)." in text
    assert "### `cudrop_fake_ns.own(x=1)`" in text and "Documented here." in text
    assert "- [`cudrop_fake_ns`](#cudrop_fake_ns)" in text


# ---- (c) README examples -------------------------------------------------------------------------

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_GPU = re.compile(r"#\s*gpu\b")
_NEEDS = re.compile(r"#\s*needs:\s*([\w.]+)")  # "# needs: torch": skipped where torch is absent


def readme_blocks():
    """[(index, first line number of the code, code, gpu_only)] of README.md's python blocks."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for i, m in enumerate(_FENCE.finditer(text)):
        code = m.group(1)
        line = text.count("\n", 0, m.start(1)) + 1
        first = code.lstrip("\n").splitlines()[0] if code.strip() else ""
        blocks.append((i, line, code, bool(_GPU.match(first.strip()))))
    return blocks


class _Timeout(Exception):
    pass


class _Runner:
    """Runs the blocks in order in one namespace, each once. A test for block i first runs the
    blocks before it (so ``-k`` on one block still sees the names they define) and reports any of
    them that failed, since a later block's error may just be the earlier one's."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.ns = {"__name__": "__readme__", "__builtins__": __builtins__}
        self.results = {}  # index -> None (ran), "gpu" (skipped) or the error text

    def run_upto(self, index):
        for i, line, code, gpu in self.blocks[:index + 1]:
            if i not in self.results:
                if gpu and not backend.gpu_available():
                    self.results[i] = "gpu"  # GPU-only blocks run on the GPU machine
                else:
                    self.results[i] = self._missing(code) or self._exec(line, code)
        return self.results[index]

    @staticmethod
    def _missing(code):
        """"needs X" when the block's first line asks for a package that is not installed."""
        m = _NEEDS.match(code.strip().splitlines()[0]) if code.strip() else None
        if m and importlib.util.find_spec(m.group(1)) is None:
            return f"needs {m.group(1)}"
        return None

    def _exec(self, line, code):
        # Pad so that tracebacks give README.md's own line numbers.
        compiled = compile("\n" * (line - 1) + code, str(README), "exec")

        def on_alarm(signum, frame):
            raise _Timeout(f"took longer than {README_BLOCK_TIMEOUT:g} s "
                           "(CUDROP_README_TIMEOUT sets the limit)")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, README_BLOCK_TIMEOUT)
        try:
            exec(compiled, self.ns)
            return None
        except BaseException as e:  # noqa: BLE001  any failure of the example is the report
            if isinstance(e, KeyboardInterrupt):
                raise
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(README)]
            at = f"README.md line {frames[-1].lineno}: " if frames else ""
            return f"{at}{type(e).__name__}: {e}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


_BLOCKS = readme_blocks()
_RUNNER = _Runner(_BLOCKS)


def _block_id(block):
    i, line, _, gpu = block
    return f"block{i + 1}-line{line}" + ("-gpu-only" if gpu else "")


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (POSIX)")
@pytest.mark.parametrize("block", _BLOCKS, ids=[_block_id(b) for b in _BLOCKS])
def test_readme_block_runs(block):
    i, line, code, gpu = block
    result = _RUNNER.run_upto(i)
    if result == "gpu":
        pytest.skip(f"README block {i + 1} (line {line}) is marked '# gpu': run where a GPU is "
                    "usable, not here")
    if result is not None and result.startswith("needs "):
        pytest.skip(f"README block {i + 1} (line {line}) {result}, which is not installed")
    if result is not None:
        earlier = [f"block {j + 1} (line {ln}): {_RUNNER.results[j]}"
                   for j, ln, _, _ in _BLOCKS[:i]
                   if _RUNNER.results.get(j) not in (None, "gpu")
                   and not _RUNNER.results[j].startswith("needs ")]
        skipped = [f"block {j + 1} (line {ln})" for j, ln, _, _ in _BLOCKS[:i]
                   if _RUNNER.results.get(j) == "gpu"]
        msg = f"README block {i + 1} (line {line}) failed: {result}"
        if earlier:
            msg += "\nearlier blocks that failed (their names may be missing here):\n  " + \
                   "\n  ".join(earlier)
        if skipped:
            msg += "\nearlier GPU-only blocks, not run: " + ", ".join(skipped)
        pytest.fail(msg, pytrace=False)


def test_readme_has_python_blocks():
    assert _BLOCKS, "README.md has no ```python blocks: test (c) would check nothing"


def test_generator_reads_constant_docs_from_comments(tmp_path, monkeypatch):
    """A constant's documentation is the '#:' block above its assignment."""
    (tmp_path / "cudrop_fake_consts.py").write_text(
        '"""Fake."""\n\n#: The kinds.\n#: Second line.\nKINDS: tuple = ("a", "b")\nUNDOC = 3\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cudrop_fake_consts", raising=False)
    import cudrop_fake_consts as m
    assert api_docs.own_doc(m.KINDS, "KINDS", m) == "The kinds.\nSecond line."
    assert api_docs.own_doc(m.UNDOC, "UNDOC", m) == ""
