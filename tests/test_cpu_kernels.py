"""Building the CPU's C kernels: cached per machine, one OpenMP runtime with torch, and a clear
fallback where they cannot be built."""
from __future__ import annotations

import os

from miniyaie import cpu_kernels
from miniyaie.cpu_kernels import load_cpu_kernels

from conftest import needs_cpu_kernel


def _openmp_runtimes() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}


@needs_cpu_kernel
def test_kernels_share_torchs_openmp_runtime(tmp_path, monkeypatch):
    """Loading the library maps no OpenMP runtime of its own: a second one would mean a second
    thread pool spinning on the same cores."""
    before = _openmp_runtimes()
    assert any("torch" in path for path in before)
    monkeypatch.setenv("MINIYAIE_CACHE", str(tmp_path))  # a fresh build, loaded now
    assert load_cpu_kernels.__wrapped__() is not None
    assert _openmp_runtimes() == before


@needs_cpu_kernel
def test_the_library_is_built_once_and_then_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIYAIE_CACHE", str(tmp_path))
    build = load_cpu_kernels.__wrapped__  # past the per-process cache
    assert build() is not None
    built = os.listdir(tmp_path / "kernels")
    assert len(built) == 1 and built[0].startswith("cpu_kernels-") and built[0].endswith(".so")
    stamp = os.stat(tmp_path / "kernels" / built[0]).st_mtime_ns
    assert build() is not None
    assert os.listdir(tmp_path / "kernels") == built
    assert os.stat(tmp_path / "kernels" / built[0]).st_mtime_ns == stamp  # not rebuilt


def test_no_compiler_means_no_kernels_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIYAIE_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    assert load_cpu_kernels.__wrapped__() is None
    assert "no C compiler found" in capsys.readouterr().err


def test_a_failing_compiler_means_no_kernels_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIYAIE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 for any arguments
    assert load_cpu_kernels.__wrapped__() is None
    assert "could not compile the CPU kernels" in capsys.readouterr().err
    assert os.listdir(tmp_path / "kernels") == []  # no half-written library left behind
