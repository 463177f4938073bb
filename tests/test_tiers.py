"""The fast tier's guard (tests/tiers.py): it names a module no fast test imports."""
import tiers


def test_every_module_is_listed_and_a_missing_one_is_named():
    modules = tiers.package_modules()
    assert {"lossbench", "lossbench.cli", "lossbench.ab.worker", "lossbench.runners.pairing"} <= modules
    loaded = set(modules)
    assert tiers.untouched(loaded, modules) == []
    # A module the tier stopped importing is named; a child-only one is not.
    assert tiers.untouched(loaded - {"lossbench.report.history", "lossbench.__main__"}, modules) == [
        "lossbench.report.history"]


def test_simulation_refuses_too_few_runs_with_exit_2(capsys):
    """Keeps report/simulation.py in the fast tier (its real runs are slow): bad input is one line, exit 2."""
    from lossbench import exit_codes
    from lossbench.report import simulation

    assert simulation.main(["only-one"]) == exit_codes.USAGE
    err = capsys.readouterr().err
    assert err.startswith("simulation: error: need at least") and err.count("\n") == 1


def test_pytest_bench_machine_info_names_every_device():
    """Keeps integrations/pytest_bench.py in the fast tier (the timed session is slow)."""
    from lossbench.integrations.pytest_bench import machine_info

    info = machine_info()
    assert "cpu" in info["devices"] and info["devices"]["cpu"]
    assert info["torch_version"] and info["threads"] >= 1
