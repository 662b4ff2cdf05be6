"""ris_core/allocator.py: glibc's thresholds raised once per process, unless the user or the platform says no."""

from __future__ import annotations

import os
import sys

import pytest

from ris_core import allocator


def clean_env(monkeypatch) -> None:
    for name in [n for n in os.environ if n in allocator.USER_SETTINGS or n == allocator.OVERRIDE]:
        monkeypatch.delenv(name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_thresholds_are_raised_on_glibc(monkeypatch):
    clean_env(monkeypatch)
    calls = []
    real = allocator.ctypes.CDLL

    class Recorded:  # the real mallopt, its calls recorded
        def __init__(self, function):
            self.function, self.argtypes, self.restype = function, None, None

        def __call__(self, option, value):
            calls.append((option, value))
            self.function.argtypes, self.function.restype = self.argtypes, self.restype
            return self.function(option, value)

    class Libc:
        def __init__(self, name):
            self.mallopt = Recorded(real(name).mallopt)

    monkeypatch.setattr(allocator.ctypes, "CDLL", Libc)
    assert allocator.keep_freed_memory() is True
    assert dict(calls) == {allocator.M_MMAP_THRESHOLD: 32 << 20, allocator.M_TRIM_THRESHOLD: 1024 << 20,
                           allocator.M_TOP_PAD: 64 << 20}


@pytest.mark.parametrize("env", [{allocator.OVERRIDE: "default"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                 {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_the_users_settings_win(monkeypatch, env):
    clean_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: pytest.fail("mallopt called against the user's say"))
    assert allocator.keep_freed_memory() is False


def test_no_glibc_no_change(monkeypatch):
    clean_env(monkeypatch)

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(allocator.ctypes, "CDLL", missing)
    assert allocator.keep_freed_memory() is False
