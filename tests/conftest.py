import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, attnzoo's Triton kernels run under Triton's interpreter (tests/test_sparse_triton.py). Triton
    # reads this setting once, when something first imports it, so it is set here, before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run tiny shapes: intra-op threads only add synchronization, and on the 2-core CI
# machine a 33x33 matmul took ~16 ms with 2 OpenMP threads against ~8 us with one.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `python -m pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test draws fresh but reproducible inputs: the seed comes from the test's name."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
