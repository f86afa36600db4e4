"""Kernel cache: generated source keyed by a hash of the spec, on disk, imported with importlib.

Files live in ``$LCPASS_CACHE_DIR/kernels`` (default ``~/.cache/lcpass/kernels``), one module per spec
named ``<template>_<key>.py``; they are written atomically, so concurrent processes share them and a
second process imports the file instead of rendering again. Triton's own compile cache then keys the
compiled binaries on the source.

>>> from lcpass.codegen.spec import KernelSpec
>>> mod = load_kernel(KernelSpec("attn_fwd", 64, 64, 64, 64, 64))    # doctest: +SKIP
>>> mod.attn_fwd                                                      # doctest: +SKIP
<triton JITFunction ...>
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from lcpass.codegen.spec import KernelSpec, render, spec_key

__all__ = ["kernel_dir", "kernel_path", "load_kernel", "load_by_key", "cache_info", "STATS"]

_LOCK = threading.Lock()
_MODULES: dict[str, ModuleType] = {}
#: counters for tests and reports: renders (source written), imports (module loaded), hits (in memory)
STATS = {"renders": 0, "imports": 0, "hits": 0}


def kernel_dir() -> Path:
    """``$LCPASS_CACHE_DIR/kernels`` (default ``~/.cache/lcpass/kernels``), created on demand."""
    env = os.environ.get("LCPASS_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "lcpass"
    return root / "kernels"


def kernel_path(spec: KernelSpec) -> Path:
    """Where the module of ``spec`` lives (whether or not it exists yet)."""
    return kernel_dir() / f"{spec.template}_{spec_key(spec)}.py"


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"lcpass.codegen: cannot import generated kernel {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # triton's JIT looks functions up through their module
    spec.loader.exec_module(mod)
    STATS["imports"] += 1
    return mod


def load_by_key(key: str) -> ModuleType:
    """The kernel module with spec key ``key`` (this process's, else the cached file on disk)."""
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            STATS["hits"] += 1
            return mod
        found = sorted(kernel_dir().glob(f"*_{key}.py"))
        if not found:
            raise KeyError(f"lcpass.codegen: no generated kernel with key {key!r} in {kernel_dir()}; "
                           f"generate it first (lcpass.codegen.load_kernel(spec))")
        mod = _MODULES[key] = _import(found[0], f"lcpass_kernel_{key}")
        return mod


def load_kernel(spec: KernelSpec) -> ModuleType:
    """The imported module for ``spec``: from memory, else from the cache file, else rendered,
    written and imported. Returns the module; its ``SPEC_KEY`` attribute is the spec key."""
    key = spec_key(spec)
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            STATS["hits"] += 1
            return mod
        path = kernel_dir() / f"{spec.template}_{key}.py"
        if not path.exists():
            _write_atomically(path, render(spec))
            STATS["renders"] += 1
        mod = _import(path, f"lcpass_kernel_{key}")
        mod.SPEC_KEY = key
        mod.SPEC = spec
        _MODULES[key] = mod
        return mod


def cache_info() -> dict:
    """Counters, the cache directory and the number of kernel files in it."""
    d = kernel_dir()
    return {**STATS, "dir": str(d), "files": len(list(d.glob("*.py"))) if d.exists() else 0}
