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
