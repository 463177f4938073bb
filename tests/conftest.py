import os

import torch

# Triton picks compiled or interpreted mode when it is first imported, for the whole process. Without
# a GPU, every Triton kernel here (ours and Liger's) is tested under the interpreter; with one, compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every Triton launch the tests make is checked against its LaunchConfig (kernels/triton check_args);
# measurements leave the check out of the timed region.
os.environ.setdefault("LOSSBENCH_CHECK_LAUNCHES", "1")

import pytest  # noqa: E402

from lossbench import quiet_exit  # noqa: E402
from lossbench.cases import Case  # noqa: E402

quiet_exit.install()


@pytest.fixture
def case():
    """Case factory with small defaults."""

    def make(family="ce", n=64, c=50, dtype="float32", dist="normal", h=None, **options):
        return Case.make(family, n, c, dtype, "cpu", dist, options, h=h)

    return make


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


# optionalhook: the hook is pytest-benchmark's, and the other tests run without that plugin too.
@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """lossbench's provenance (device names, library versions, threads, git sha) in every JSON that
    pytest-benchmark writes: importers/pytest_benchmark.py builds its rows' provenance from it."""
    from lossbench.integrations.pytest_bench import machine_info as lossbench_machine_info

    machine_info["lossbench"] = lossbench_machine_info()


def pytest_sessionfinish(session, exitstatus):
    """The fast tier fails when it no longer touches some module of lossbench (tests/tiers.py)."""
    import tiers

    if exitstatus == 0 and tiers.is_whole_fast_tier(session.config):
        missing = tiers.untouched(tiers.loaded_modules())
        if missing:
            session.config.get_terminal_writer().line(
                f"the fast tier (-m 'not slow') touches no test of: {', '.join(missing)}", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_sessionstart(session):
    """CI (.ci/run) sets LOSSBENCH_REQUIRE_COMPILER=1: there, native kernels that do not build fail the
    session up front instead of letting their tests skip and `fused` fall back unseen."""
    if os.environ.get("LOSSBENCH_REQUIRE_COMPILER") == "1":
        from lossbench.kernels import native

        for name in ("vec_exp", "cross_entropy", "kl_div"):
            reason = native.unavailable_reason(name)
            if reason:
                pytest.exit(f"LOSSBENCH_REQUIRE_COMPILER=1 but the native kernel {name} does not build: {reason}",
                            returncode=1)
