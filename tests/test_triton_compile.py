"""Every Triton kernel variant compiles for real GPUs (sm_80, sm_90), ahead of time: no GPU needed.

The interpreter (test_triton_kernels.py) runs plain Python, so it accepts code the compiler refuses:
here every variant the launchers can produce goes through triton.compile, and its cubin must fit:
registers, no spills, shared memory. Compiles run in worker processes (aot.py), as this process
may have triton in interpreter mode.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import torch  # noqa: E402

from lossbench.kernels import triton as tk  # noqa: E402 (imports no triton)
from lossbench.kernels.triton import LaunchConfig, Variant, aot, device_function  # noqa: E402

ce_mod = importlib.import_module("lossbench.kernels.triton.cross_entropy")
kl_mod = importlib.import_module("lossbench.kernels.triton.kl_div")
jsd_mod = importlib.import_module("lossbench.kernels.triton.jsd")
lce_mod = importlib.import_module("lossbench.kernels.triton.linear_cross_entropy")

ARCHS = ("sm_80", "sm_90")
KERNEL_FNS = {"ce": ce_mod._ce_kernel, "kl": kl_mod._kl_kernel, "jsd": jsd_mod._jsd_kernel}
timing = {}


@pytest.fixture(scope="module")
def table():
    start = time.perf_counter()
    rows = aot.resource_table(ARCHS)
    timing["resource_table_s"] = time.perf_counter() - start
    print(f"\ncompiled {len(rows)} variants in {timing['resource_table_s']:.1f} s")
    return rows


@pytest.mark.slow
def test_every_variant_compiles_and_fits(table):
    expected = [(v.kernel, v.name, arch) for v in aot.variants() for arch in ARCHS]
    assert sorted((r.kernel, r.variant, r.arch) for r in table) == sorted(expected)
    assert len(set(expected)) == len(expected)  # variant names are unique
    bad = []
    for r in table:
        limit = aot.SHARED_LIMIT[int(r.arch[3:])]
        if r.cubin_bytes <= 0:
            bad.append(f"{r}: no cubin")
        if not 0 < r.registers <= aot.MAX_REGISTERS:
            bad.append(f"{r}: registers")
        # A spill in a hot kernel is a defect, float64 included: none spills.
        if r.spill_bytes or r.local_bytes or r.stack_bytes:
            bad.append(f"{r}: spills")
        if r.shared_bytes + r.static_shared_bytes > limit:
            bad.append(f"{r}: shared memory over {limit}")
    assert not bad, "\n".join(bad)


# --- the enumeration covers the kernels and the launchers ------------------------------------------
def _params(fn):
    params = inspect.signature(fn).parameters
    constexprs = [n for n, p in params.items() if "constexpr" in str(p.annotation)]
    return [n for n in params if n not in constexprs], constexprs


@pytest.mark.parametrize("kernel", sorted(KERNEL_FNS))
def test_variants_declare_every_argument_and_vary_every_flag(kernel):
    fn = KERNEL_FNS[kernel]
    runtime, constexprs = _params(fn)
    assert constexprs  # the kernels have constexprs: the parsing above found them
    variants = aot.variants([kernel])
    for v in variants:
        assert v.fn is fn and v.kernel == kernel
        assert list(v.config.signature) == runtime, v.name  # every runtime argument typed, in order
        assert sorted(v.config.constexprs) == sorted(constexprs), v.name  # every constexpr set
    # Every flag takes both values (a flag with a default the enumeration does not pass fails here);
    # ROUND_BF16 (the interpreter's rounding workaround) is never compiled.
    for name in constexprs:
        values = {v.config.constexprs[name] for v in variants}
        if name == "ROUND_BF16":
            assert values == {False}
        elif isinstance(next(iter(values)), bool):
            assert values == {False, True}, name
    # Every dtype, for the input pointer and the accumulation.
    assert {v.config.signature["X"] for v in variants} == {"*fp32", "*bf16", "*fp16", "*fp64"}
    assert {v.config.constexprs["ACC"].name for v in variants} == {"float32", "float64"}


def test_ce_variants_follow_the_block_rule(monkeypatch):
    blocks = {(v.dtype, v.config.constexprs["BLOCK"], v.config.num_warps) for v in aot.variants(["ce"])}
    assert blocks == {(dtype, block, 16 if (dtype, block) == ("float64", 4096) else {1024: 4, 4096: 8}[block])
                      for dtype in ("float32", "bfloat16", "float16", "float64") for block in (1024, 4096)}
    monkeypatch.setattr(ce_mod, "MAX_BLOCK", 256)  # as test_triton_kernels does: the rule is capped
    assert {v.config.constexprs["BLOCK"] for v in aot.variants(["ce"])} == {256}


def test_kl_variants_include_int64_counts():
    assert {v.config.signature["n"] for v in aot.variants(["kl"])} == {"i32", "i64"}
    assert kl_mod.kl_config(torch.float32, target_dtype=torch.float32, mode=1, log_target=False,
                            n=2**31).signature["n"] == "i64"


def test_jsd_variants_cover_beta_cases_and_int64_sizes():
    variants = aot.variants(["jsd"])
    assert {v.config.constexprs["BETA_CASE"] for v in variants} == {0, 1, 2}
    assert {v.config.signature["n_cols"] for v in variants} == {"i32", "i64"}
    assert {v.config.signature["ignore_index"] for v in variants} == {"i32", "i64"}
    assert {v.config.signature["LABEL"] for v in variants if v.config.constexprs["HAS_LABEL"]} == {"*i64"}


def test_launchers_use_enumerated_configs(monkeypatch):
    """Runs the public functions with launching replaced by a recorder: every configuration the
    launchers produce is one of the enumerated variants, and its arguments match it."""
    seen = []

    def record(fn, grid, config, args):
        tk.check_args(fn, config, args)
        seen.append((fn, config.key()))

    for mod in (ce_mod, kl_mod, lce_mod, jsd_mod):
        monkeypatch.setattr(mod, "_check_device", lambda t: None)
    for mod in (ce_mod, kl_mod, jsd_mod):
        monkeypatch.setattr(mod, "launch", record)
        monkeypatch.setattr(mod, "_interpreting", lambda: False)  # what runs on a GPU

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for c in (7, 1500):
            x = torch.randn(3, c, generator=g).to(dtype).requires_grad_(True)
            y = torch.tensor([0, -100, c - 1])
            w = torch.rand(c, generator=g).to(dtype)
            tk.cross_entropy(x, y, weight=w, label_smoothing=0.1, lse_square_scale=1e-3).backward()
            with torch.no_grad():  # no gradient; uint8 targets (torch takes them) are read as int64
                tk.cross_entropy(x, y.clamp(min=0).to(torch.uint8 if c < 256 else torch.int64), reduction="sum")
        t = torch.rand(3, 5, generator=g)
        for t_dtype in (dtype, torch.float64, torch.bfloat16):
            x = torch.randn(3, 5, generator=g).to(dtype).requires_grad_(True)
            tk.kl_div(x, t.to(t_dtype), reduction="none").sum().backward()  # modes 0 and 2
            tk.kl_div(x, t.log().to(t_dtype), reduction="batchmean", log_target=True).backward()  # mode 1
        for beta, label in ((0.0, None), (1.0, torch.tensor([0, -100, 2])), (0.4, torch.tensor([1, 1, 1]))):
            x = torch.randn(3, 5, generator=g).log_softmax(-1).to(dtype).requires_grad_(True)
            tk.jsd(x, torch.randn(3, 5, generator=g).log_softmax(-1).to(dtype), label=label, beta=beta).backward()
    h = torch.randn(4, 8, generator=g, requires_grad=True)
    tk.linear_cross_entropy(h, torch.randn(50, 8, generator=g), torch.tensor([1, 2, -100, 49]),
                            label_smoothing=0.1).backward()

    known = {(v.fn, v.config.key()) for v in aot.variants()}
    assert len({key for _, key in seen}) > 20
    missing = [key for key in seen if key not in known]
    assert not missing, missing[:3]


def test_every_launch_in_the_tests_is_checked(monkeypatch):
    """conftest turns LOSSBENCH_CHECK_LAUNCHES on, so each launch the kernel tests make goes through
    check_args; a launch whose arguments differ from its config is refused before it runs."""
    assert tk.CHECK_LAUNCHES
    ran = []
    monkeypatch.setattr(tk, "_jit", lambda fn: {None: lambda *a, **k: ran.append(a)})  # records, runs nothing
    v = _variant(_kernel_calling_jit)
    with pytest.raises(AssertionError, match="config declares"):
        tk.launch(v.fn, None, v.config, {"Y": torch.zeros(128)})
    with pytest.raises(AssertionError, match=r"X: \*fp64 \(declared \*fp32\)"):
        tk.launch(v.fn, None, v.config, {"X": torch.zeros(128, dtype=torch.float64)})
    assert not ran
    tk.launch(v.fn, None, v.config, {"X": torch.zeros(128)})
    assert len(ran) == 1


# --- the check catches what the interpreter lets through --------------------------------------------
tl = None  # triton.language, bound by lossbench's _jit as in the kernel modules


def _plain_double(x):
    return x * 2


@device_function
def _jit_double(x):
    return x * 2


def _kernel_calling_plain(X, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    # The bug this module guards against: a plain Python helper, even in a branch that is off.
    offs = tl.arange(0, BLOCK)
    v = tl.load(X + offs)
    if ROUND:
        v = _plain_double(v)
    tl.store(X + offs, v)


def _kernel_calling_jit(X, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(X + offs)
    if ROUND:
        v = _jit_double(v)
    tl.store(X + offs, v)


def _variant(fn):
    return Variant("test", fn.__name__, "float32", fn,
                   LaunchConfig({"X": "*fp32"}, {"ROUND": False, "BLOCK": 128}, num_warps=4))


def test_compile_refuses_a_kernel_calling_plain_python():
    with pytest.raises(aot.CompileError, match="Unsupported function referenced"):
        aot.compile_variant(_variant(_kernel_calling_plain), "sm_90")
    row = aot.compile_variant(_variant(_kernel_calling_jit), "sm_90")  # the fix: a jit helper
    assert row.cubin_bytes > 0 and row.registers > 0 and row.spill_bytes == 0


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function _ce_kernel:
  REG:86 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:632 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other:
  REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400
"""
    usage = aot.parse_resource_usage(text)
    assert usage["_ce_kernel"] == {"REG": 86, "STACK": 16, "SHARED": 1024, "LOCAL": 8, "CONSTANT[0]": 632,
                                   "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}
    assert usage["other"]["REG"] == 12
    assert aot.parse_resource_usage("") == {}


def test_missing_cuobjdump_is_a_clear_error(monkeypatch):
    if tk._mode_mismatch() or ("triton.language" not in sys.modules and not tk._interpreting()):
        pytest.skip("would import triton in compiled mode here, ahead of the interpreter tests")
    import triton

    knob = vars(type(triton.knobs.nvidia))["cuobjdump"]  # where triton looks: the wheel's bin/, or the env
    monkeypatch.setattr(knob, "default_path", "/nonexistent/cuobjdump")
    monkeypatch.delenv("TRITON_CUOBJDUMP_PATH", raising=False)
    with pytest.raises(RuntimeError, match="cuobjdump not found.*TRITON_CUOBJDUMP_PATH"):
        aot.cuobjdump_path()


@pytest.mark.slow
def test_format_rows(table):
    df = aot.format_rows(table)
    assert list(df.columns) == ["kernel", "variant", "arch", "registers", "spill_bytes", "shared_bytes",
                                "compile_s"]
    assert len(df) == len(table)
