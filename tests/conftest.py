import pytest
import torch

from lossbench.cases import Case


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
