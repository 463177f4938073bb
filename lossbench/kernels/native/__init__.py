"""Compiled C++ CPU kernels: build on first use, cache the build, fall back cleanly.

    lib = load("cross_entropy")          # ctypes.CDLL of lossbench/kernels/native/cross_entropy.cpp
    reason = unavailable_reason("kl")    # None when it builds, else one line saying why not

Kernels are plain `extern "C"` functions over raw pointers, called through ctypes (which releases the
GIL): the sources include only <ATen/Parallel.h> (for at::parallel_for, torch's own OpenMP pool, which
follows torch.set_num_threads) and the C++ standard library. A build takes about 1 s here, where one
including <torch/extension.h> (pybind11 and all of ATen) takes 24 s (g++ 12, measured 2026-12-05).

Build directory: $LOSSBENCH_NATIVE_DIR, else ~/.cache/lossbench/native, one subdirectory per key: a hash
of the source text, the flags, torch's version and the CPU (model and feature flags: the code is built
with -march=native, so a .so is only valid on the CPU that built it). A second process waits for a
build in progress under an flock (released by the kernel if the builder dies), then uses its result.

With ninja installed the build goes through torch.utils.cpp_extension.load() (torch's own flags and
link line); without it, g++ is called directly with the same include and library paths, so a fresh
machine with only a compiler still builds. LOSSBENCH_NATIVE=0 disables every kernel (the callers fall
back to their Python paths): for tests and comparisons.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

__all__ = ["NativeUnavailable", "load", "unavailable_reason", "fallback_note", "cpu_row_note", "grad_buffer", "disabled",
           "build_dir", "CFLAGS"]

SRC_DIR = Path(__file__).resolve().parent

# -O3 vectorises the kernels' loops; -march=native picks the widest vector unit the CPU has (AVX2 + FMA,
# AVX-512). No -ffast-math: the kernels rely on NaN and infinity semantics and on the order of their
# sums; -fopenmp-simd enables `#pragma omp simd reduction` (vectorised reductions, no OpenMP runtime).
CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-DNDEBUG"]


class NativeUnavailable(RuntimeError):
    """The native kernel cannot be used here; str() is a one-line reason."""


_cache: dict[str, ctypes.CDLL | NativeUnavailable] = {}
_lock = threading.Lock()


def disabled() -> bool:
    return os.environ.get("LOSSBENCH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _cpu_id() -> str:
    """The CPU model and feature flags: what -march=native compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines()
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++")


def build_dir(name: str) -> Path:
    """Where `name` is (or would be) built: a key over everything the .so depends on."""
    src = (SRC_DIR / f"{name}.cpp").read_bytes()
    headers = b"".join(p.name.encode() + p.read_bytes() for p in sorted(SRC_DIR.glob("*.h")))
    h = hashlib.sha256()
    for part in (src, headers, " ".join(CFLAGS).encode(), torch.__version__.encode(), _cpu_id().encode(),
                 (_compiler() or "").encode()):
        h.update(part)
        h.update(b"\0")
    root = os.environ.get("LOSSBENCH_NATIVE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lossbench", "native")
    return Path(root) / f"{name}-{h.hexdigest()[:16]}"


def _first_error(text: str) -> str:
    """The compiler's first error line (or the text's first line), without its ANSI colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r": (fatal )?error: ", r"\berror\b", r"(?i)error"):
        for ln in lines:
            if re.search(pattern, ln) and not ln.startswith(("FAILED:", "ninja: build stopped")):
                return ln[:300]
    return (lines[0] if lines else "unknown build failure")[:300]


def _build_with_torch(name: str, src: Path, out: Path) -> Path:
    from torch.utils import cpp_extension

    # is_python_module=False: a plain shared library (no PyInit), loaded with torch.ops.load_library.
    # torch's FileBaton ('lock' in the build directory) guards its own build; a builder killed mid-build
    # leaves that file behind and every later load() would wait on it forever, so it is removed here,
    # under our flock (no other lossbench build of this key can be running).
    (out / "lock").unlink(missing_ok=True)
    path = cpp_extension.load(name=f"lossbench_{name}", sources=[str(src)], extra_cflags=CFLAGS,
                              build_directory=str(out), is_python_module=False, verbose=False)
    return Path(path)


def _build_with_gxx(name: str, src: Path, out: Path) -> Path:
    """Without ninja (torch's load() needs it): one direct compiler call, same paths, atomic rename."""
    from torch.utils import cpp_extension

    cxx = _compiler()
    lib = out / f"lossbench_{name}.so"
    if lib.exists():
        return lib
    tmp = out / f".{lib.name}.{os.getpid()}.tmp"
    cmd = [cxx, "-shared", "-fPIC", "-std=c++20", *CFLAGS, str(src), "-o", str(tmp)]
    for p in cpp_extension.include_paths():
        cmd += ["-isystem", p]
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    cmd += [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(res.stderr or res.stdout)
    os.replace(tmp, lib)
    return lib


def _build(name: str) -> ctypes.CDLL:
    src = SRC_DIR / f"{name}.cpp"
    if not src.exists():
        raise NativeUnavailable(f"no native source {src.name}")
    if _compiler() is None:
        raise NativeUnavailable("no C++ compiler (g++ / $CXX) found")
    out = build_dir(name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lockf = open(out / "build.flock", "w")
    except OSError as exc:
        raise NativeUnavailable(f"cannot create the build directory {out}: {exc.strerror}") from None
    from torch.utils import cpp_extension

    try:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # a concurrent builder of the same key: wait for it
        try:
            if cpp_extension.is_ninja_available():
                path = _build_with_torch(name, src, out)
            else:
                path = _build_with_gxx(name, src, out)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            raise NativeUnavailable(f"{name}.cpp did not build: {_first_error(str(exc))}") from None
    finally:
        lockf.close()
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"{name}: the built library does not load: {_first_error(str(exc))}") from None


def load(name: str) -> ctypes.CDLL:
    """The compiled kernel library `name` (built on first use, cached per process and on disk), or
    NativeUnavailable with a one-line reason."""
    if disabled():
        raise NativeUnavailable("native kernels disabled (LOSSBENCH_NATIVE=0)")
    with _lock:
        got = _cache.get(name)
        if got is None:
            try:
                got = _build(name)
            except NativeUnavailable as exc:
                got = exc
            _cache[name] = got
    if isinstance(got, NativeUnavailable):
        raise NativeUnavailable(str(got))
    return got


def unavailable_reason(name: str) -> str | None:
    """None when `name` builds and loads here, else the one-line reason it does not."""
    try:
        load(name)
    except NativeUnavailable as exc:
        return str(exc)
    return None


def fallback_note(name: str) -> str | None:
    """The one-line note a row carries when an implementation fell back from kernel `name`."""
    reason = unavailable_reason(name)
    return None if reason is None else f"native kernel unavailable, Python fallback ({reason})"


def cpu_row_note(name: str):
    """An Implementation `note` (see lossbench/implementation.py) for an implementation that runs kernel
    `name` on the CPU and falls back without it: rows on the CPU carry fallback_note(name)."""
    def note(case) -> str | None:
        if str(getattr(case, "device", "cpu")).split(":")[0] != "cpu":
            return None
        return fallback_note(name)

    return note


# --- gradient buffers ----------------------------------------------------------------------------
# torch's CPU allocator hands every large block straight to the OS (glibc mmaps allocations above
# 32 MiB and unmaps them on free), so a fresh 1 GiB gradient is 262144 page faults, each zeroing a 4 KiB
# page: measured here (2026-12-05, 2 shared cores) a fresh 1 GiB write takes 220-300 ms, a write into
# already mapped pages 39 ms, and an ideal fused cross-entropy 8192x32768 about 66 ms in all. Advising
# the fresh buffer's range for transparent huge pages (MADV_HUGEPAGE, honoured when THP is "madvise" or
# "always") makes it 512 faults of 2 MiB: 53 ms median for the same fresh write, with occasional
# slower first touches when the kernel must compact memory. The buffer stays a fresh, counted allocation:
# recycling a cached buffer across calls was measured too (39 ms) but hides the gradient from the
# harness's peak-memory measurement, which takes its baseline after set-up.
_HUGE_MIN_BYTES = 64 << 20
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def grad_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor, its pages advised for huge pages when it is large (before
    the first touch: the kernel then writes it in 2 MiB pages)."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    fn = _madvise() if nbytes >= _HUGE_MIN_BYTES and sys.platform.startswith("linux") else None
    if fn is not None:
        p = t.data_ptr()
        a, e = (p + _HUGE - 1) & ~(_HUGE - 1), (p + nbytes) & ~(_HUGE - 1)
        if e > a:
            fn(a, e - a, _MADV_HUGEPAGE)  # advice only: ignored (EINVAL) where THP is off
    return t
