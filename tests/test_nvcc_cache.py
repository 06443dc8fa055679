"""The content-hash cache of the kernel compile check (``_nvcc_cache``), against a fake nvcc that
logs its compiles and fails on sources containing ``BAD``: a success is compiled once, a failure
every time, and a broken cache directory only costs a compile."""
import os
import stat

import pytest

from _nvcc_cache import Compiler

FAKE = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "fake nvcc $FAKE_NVCC_VERSION"; exit 0; fi
for a in "$@"; do src="$a"; done
echo "$src" >> "$FAKE_NVCC_LOG"
if grep -q BAD "$src"; then echo "error: BAD in $src" >&2; exit 2; fi
exit 0
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(FAKE)
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "log"
    log.write_text("")
    monkeypatch.setenv("FAKE_NVCC_LOG", str(log))
    monkeypatch.setenv("FAKE_NVCC_VERSION", "1")
    monkeypatch.setenv("CUDROP_NVCC_CACHE", str(tmp_path / "cache"))

    def run(jobs):
        c = Compiler(str(nvcc), jobs, workers=2)
        try:
            return {k: f.result() for k, f in c.results.items()}
        finally:
            c.close()

    run.compiles = lambda: len(log.read_text().splitlines())
    run.cache = tmp_path / "cache"
    return run


def test_success_compiled_once(fake):
    jobs = {("a.cu", "sm_80"): "ok", ("a.cu", "sm_90a"): "ok", ("b.cu", "sm_80"): "ok b"}
    first = fake(jobs)
    assert fake.compiles() == 3 and all(r.returncode == 0 and not r.cached for r in first.values())
    second = fake(jobs)
    assert fake.compiles() == 3 and all(r.returncode == 0 and r.cached for r in second.values())


def test_failure_not_cached(fake):
    for _ in range(2):
        r = fake({("a.cu", "sm_80"): "BAD"})[("a.cu", "sm_80")]
        assert r.returncode != 0 and not r.cached and "BAD" in r.stderr
    assert fake.compiles() == 2


def test_key_covers_text_arch_and_version(fake, monkeypatch):
    fake({("a.cu", "sm_80"): "ok"})
    fake({("a.cu", "sm_80"): "ok, edited"})
    fake({("a.cu", "sm_90a"): "ok"})
    monkeypatch.setenv("FAKE_NVCC_VERSION", "2")
    fake({("a.cu", "sm_80"): "ok"})
    assert fake.compiles() == 4


def test_cache_dir_is_a_file(fake):
    fake.cache.write_text("not a directory")
    for _ in range(2):
        assert fake({("a.cu", "sm_80"): "ok"})[("a.cu", "sm_80")].returncode == 0
    assert fake.compiles() == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_cache_dir_unwritable(fake):
    fake.cache.mkdir()
    fake.cache.chmod(0o500)
    try:
        for _ in range(2):
            assert fake({("a.cu", "sm_80"): "ok"})[("a.cu", "sm_80")].returncode == 0
    finally:
        fake.cache.chmod(0o700)
    assert fake.compiles() == 2


def test_corrupt_marker_is_a_miss(fake):
    fake({("a.cu", "sm_80"): "ok"})
    (marker,) = fake.cache.iterdir()
    marker.write_bytes(b"\xff\xfe garbage")
    assert not fake({("a.cu", "sm_80"): "ok"})[("a.cu", "sm_80")].cached
    assert fake.compiles() == 2
    assert fake({("a.cu", "sm_80"): "ok"})[("a.cu", "sm_80")].cached
