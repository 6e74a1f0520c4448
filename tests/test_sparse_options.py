"""SparseKernelOptions: one frozen options object for the sparse kernels, per process or per block."""
import threading

import pytest

from attnzoo.ops.sparse import (SparseKernelOptions, set_sparse_kernel_options, sparse_kernel_options,
                                use_sparse_kernel_options)


def test_defaults_are_the_measured_fast_path():
    o = SparseKernelOptions()
    assert o.autotune and o.fixed_reference
    assert (o.fixed_min_width, o.fixed_min_rows, o.split_min, o.split_factor) == (448, 1 << 17, 8, 2)
    assert o.flex_compile_mode is None
    with pytest.raises(Exception):
        o.autotune = False  # frozen


def test_a_block_changes_them_for_itself_only():
    before = sparse_kernel_options()
    with use_sparse_kernel_options(autotune=False) as inner:
        assert sparse_kernel_options() is inner and not inner.autotune
        with use_sparse_kernel_options(split_min=3):
            assert sparse_kernel_options().split_min == 3 and not sparse_kernel_options().autotune
        seen = []
        t = threading.Thread(target=lambda: seen.append(sparse_kernel_options()))
        t.start()
        t.join()
        assert seen == [before]  # another thread starts from the process default
    assert sparse_kernel_options() == before


def test_the_process_default_is_set_and_restored():
    previous = set_sparse_kernel_options(fixed_reference=False)
    try:
        assert not sparse_kernel_options().fixed_reference
        with use_sparse_kernel_options(SparseKernelOptions()):
            assert sparse_kernel_options().fixed_reference
    finally:
        set_sparse_kernel_options(previous)
    assert sparse_kernel_options() == previous


@pytest.mark.parametrize("changes, error, words", [
    (dict(autotune=1), TypeError, "autotune=1"),
    (dict(split_min=-1), ValueError, "split_min=-1"),
    (dict(fixed_min_width=2.5), TypeError, "fixed_min_width=2.5"),
    (dict(flex_compile_mode=3), TypeError, "flex_compile_mode=3"),
    (dict(autotun=False), ValueError, "Did you mean 'autotune'"),
])
def test_bad_options_name_the_option(changes, error, words):
    with pytest.raises(error, match=words):
        with use_sparse_kernel_options(**changes):
            pass
    with pytest.raises(TypeError, match="expected a SparseKernelOptions"):
        set_sparse_kernel_options({"autotune": False})
