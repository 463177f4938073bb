"""Ahead-of-time compilation of every kernel variant, for its registers, spills and shared memory.

No GPU is needed: triton.compile builds a cubin for a GPUTarget, and the wheel's cuobjdump reads the
resource usage out of it. Each kernel module enumerates its variants from the configuration
function its launcher calls (ce_config, kl_config), and a variant compiles with the launcher's own
options (LaunchConfig.options()), so the table shows the code that runs.

triton decides between compiling and interpreting when it is imported, for the whole process (its
own library, tl.sum and the like, is wrapped for one mode). Under TRITON_INTERPRET=1 nothing can be
compiled in-process, so compiles run in fresh worker processes with TRITON_INTERPRET unset, each
with a private, temporary triton cache (compile times are real, and no cubins for GPUs this machine
may not have end up in the user's cache).

    from lossbench.kernels.triton import aot
    print(aot.format_rows(aot.resource_table()).to_string(index=False))
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from . import Variant, _interpreting, _jit, _mode_mismatch

ARCHS = ("sm_80", "sm_90")
KERNELS = {"ce": "cross_entropy", "kl": "kl_div", "jsd": "jsd"}  # linear_cross_entropy launches the ce kernel
# Largest shared memory one block may use (opt-in), in bytes: A100, consumer Ampere and Ada, H100.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255


class CompileError(RuntimeError):
    """A variant that triton could not compile (the message names it and gives triton's error)."""


@dataclass(frozen=True)
class ResourceRow:
    kernel: str
    variant: str
    dtype: str  # the input dtype's name
    arch: str
    registers: int  # per thread
    spill_bytes: int  # per thread: local memory or stack frame, whichever is larger (0 = no spills)
    local_bytes: int
    stack_bytes: int
    shared_bytes: int  # per block, dynamic (triton's metadata.shared)
    static_shared_bytes: int  # per block, static (the cubin's SHARED)
    cubin_bytes: int
    compile_s: float


def variants(kernels: Iterable[str] | None = None) -> list[Variant]:
    """The variants of the named kernels ("ce", "kl"; default all), from the kernel modules."""
    names = list(KERNELS) if kernels is None else list(kernels)
    unknown = [k for k in names if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; known: {list(KERNELS)}")
    out = []
    for name in names:
        out += importlib.import_module(f"{__package__}.{KERNELS[name]}").variants()
    return out


def _capability(arch: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(f"arch {arch!r}: expected sm_<capability>, e.g. sm_90")
    return int(m.group(1))


def cuobjdump_path() -> str:
    import triton

    try:
        return triton.knobs.nvidia.cuobjdump.path
    except RuntimeError as exc:
        raise RuntimeError("cuobjdump not found: it ships with triton's NVIDIA backend "
                           "(triton/backends/nvidia/bin); point TRITON_CUOBJDUMP_PATH at one") from exc


_FUNCTION = re.compile(r"^\s*Function\s+(\S+?)\s*:\s*$", re.M)
_FIELD = re.compile(r"\b([A-Z]+(?:\[\d+\])?)\s*:\s*(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump --dump-resource-usage output -> {function name: {"REG": 86, "STACK": 0, ...}}.
    The fields of a function are those on the lines after its "Function <name>:" header."""
    heads = list(_FUNCTION.finditer(text))
    out = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out[head.group(1)] = {k: int(v) for k, v in _FIELD.findall(text[head.end():end])}
    return out


def cubin_usage(cubin: bytes, name: str) -> dict[str, int]:
    """Resource usage of kernel `name` in `cubin`: REG, STACK, LOCAL, SHARED ... (cuobjdump)."""
    tool = cuobjdump_path()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    usage = parse_resource_usage(done.stdout).get(name)
    if not usage or "REG" not in usage:
        raise RuntimeError(f"no register count for {name} in cuobjdump's output:\n{done.stdout}")
    return usage


def _compile_here(variant: Variant, arch: str) -> ResourceRow:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit(variant.fn)  # binds tl and the jit helpers, as for a launch
    cfg = variant.config
    constexprs = cfg.kernel_constexprs()
    # The signature in the kernel's argument order, constexprs included.
    signature = {a: cfg.signature.get(a, "constexpr") for a in fn.arg_names}
    missing = [a for a in fn.arg_names if a not in cfg.signature and a not in constexprs]
    extra = [a for a in list(cfg.signature) + list(constexprs) if a not in fn.arg_names]
    if missing or extra:
        raise CompileError(f"{variant.kernel} {variant.name}: config misses arguments {missing}, "
                           f"names unknown ones {extra}")
    start = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", _capability(arch), 32), options=cfg.options())
        cubin = k.asm["cubin"]
    except Exception as exc:  # triton's errors do not all survive pickling: keep their text
        raise CompileError(f"{variant.kernel} {variant.name} for {arch}: {type(exc).__name__}: {exc}") from None
    seconds = time.perf_counter() - start
    usage = cubin_usage(cubin, k.metadata.name)
    local, stack = usage.get("LOCAL", 0), usage.get("STACK", 0)
    return ResourceRow(variant.kernel, variant.name, variant.dtype, arch, usage["REG"], max(local, stack), local,
                       stack, int(k.metadata.shared), usage.get("SHARED", 0), len(cubin), round(seconds, 3))


def _can_compile_here() -> bool:
    return not _interpreting() and not _mode_mismatch()


@contextlib.contextmanager
def _private_cache():
    import triton

    with tempfile.TemporaryDirectory(prefix="lossbench-aot-") as tmp, triton.knobs.cache.scope():
        triton.knobs.cache.dir = tmp
        yield


def compile_variant(variant: Variant, arch: str) -> ResourceRow:
    """Compiles `variant` for `arch` ("sm_90") and reads its resources; raises CompileError if
    triton refuses it. In-process when triton compiles here, else in a worker process."""
    _capability(arch)
    if _can_compile_here():
        with _private_cache():
            return _compile_here(variant, arch)
    return _run([(variant, arch)], workers=1)[0]


# --- worker processes -------------------------------------------------------------------------------
# Plain subprocesses rather than multiprocessing: its spawned children re-run the parent's main
# module (a script, stdin, a notebook), where triton may be imported in the wrong mode. A worker
# gets the parent's sys.path, then (variant, arch) jobs as length-prefixed pickles on stdin, and
# answers on its original stdout (its fd 1 goes to stderr, so nothing else can write there).
_BOOT = ("import pickle, sys; sys.path[:] = pickle.loads(sys.stdin.buffer.read(int(sys.stdin.buffer.readline())));"
         " from lossbench.kernels.triton.aot import _worker_main; _worker_main()")


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(b"%d\n" % len(data) + data)
    stream.flush()


def _receive(stream):
    """The next frame's bytes, or None at the end of the stream."""
    head = stream.readline()
    if not head:
        return None
    size = int(head)
    data = stream.read(size)
    if len(data) != size:
        return None
    return data


def _worker_main() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, not into the answers
    sys.stdout = sys.stderr
    while (data := _receive(sys.stdin.buffer)) is not None:
        index = None
        try:
            index, variant, arch = pickle.loads(data)
            answer = (index, True, _compile_here(variant, arch))
        except Exception as exc:  # noqa: BLE001 - every failure goes back as text
            compile_error = isinstance(exc, CompileError)
            answer = (index, False, (compile_error, str(exc) if compile_error else f"{type(exc).__name__}: {exc}"))
        _send(out, answer)


def _worker_env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache_dir
    return env


def _cost(job) -> tuple:
    variant, _ = job
    return (variant.kernel == "ce", variant.config.constexprs.get("BLOCK", 0), variant.dtype == "float64")


def _run(jobs, workers: int | None = None, progress: Callable | None = None) -> list[ResourceRow]:
    """Compiles (variant, arch) jobs in `workers` worker processes; rows in the jobs' order."""
    import queue
    import threading

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in sorted(range(len(jobs)), key=lambda i: _cost(jobs[i]), reverse=True):  # long ones first
        todo.put(i)
    answers: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def serve(proc, log):
        try:
            _send(proc.stdin, sys.path)
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    break
                _send(proc.stdin, (i, *jobs[i]))
                data = _receive(proc.stdout)
                if data is None:
                    proc.wait()
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    variant, arch = jobs[i]
                    answers.put((i, False, (False, f"AOT worker exited ({proc.returncode}) compiling "
                                                   f"{variant.kernel} {variant.name} for {arch}:\n{tail}")))
                    return
                answers.put(pickle.loads(data))
        except Exception as exc:  # noqa: BLE001 - reported to the main thread
            answers.put((None, False, (False, f"AOT worker: {type(exc).__name__}: {exc}")))
        finally:
            answers.put(None)  # this worker is done

    rows: list[ResourceRow | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="lossbench-aot-") as cache_dir, contextlib.ExitStack() as stack:
        procs, threads = [], []
        for _ in range(workers):
            log = stack.enter_context(tempfile.TemporaryFile())
            proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, env=_worker_env(cache_dir), cwd=os.getcwd())
            procs.append(proc)
            threads.append(threading.Thread(target=serve, args=(proc, log), daemon=True))
        error = None
        try:
            for t in threads:
                t.start()
            running, done = len(threads), 0
            while running:
                answer = answers.get()
                if answer is None:
                    running -= 1
                    continue
                index, ok, value = answer
                if not ok:
                    error = error or value
                    stop.set()
                    continue
                rows[index] = value
                done += 1
                if progress is not None and error is None:
                    progress(value, done, len(jobs))
        finally:
            stop.set()
            for proc in procs:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
            for t in threads:
                t.join(timeout=5)
    if error is not None:
        compile_error, message = error
        raise (CompileError if compile_error else RuntimeError)(message)
    return rows


def validate(archs=ARCHS, kernels=None) -> int:
    """Raises ValueError for an unknown arch or kernel; returns the number of compiles they ask for."""
    for arch in archs:
        _capability(arch)
    return len(variants(kernels)) * len(archs)


def resource_table(archs=ARCHS, kernels=None, progress: Callable | None = None,
                   workers: int | None = None) -> list[ResourceRow]:
    """Compiles every variant of `kernels` (default all) for each arch; one ResourceRow each.

    progress(row, done, total) is called as compiles finish. workers: processes (os.cpu_count())."""
    for arch in archs:
        _capability(arch)
    jobs = [(v, arch) for v in variants(kernels) for arch in archs]
    return _run(jobs, workers, progress)


def format_rows(rows: Iterable[ResourceRow]):
    """The rows as a pandas DataFrame: kernel, variant, arch, registers, spill/shared bytes, compile s."""
    import pandas as pd

    columns = ["kernel", "variant", "arch", "registers", "spill_bytes", "shared_bytes", "compile_s"]
    return pd.DataFrame([asdict(r) for r in rows], columns=list(ResourceRow.__dataclass_fields__))[columns]
