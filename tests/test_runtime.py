import pytest
import torch

from ctxvec.runtime import native_bf16, precision_dtype, release_memory, set_threads


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_threads_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match="threads"):
        set_threads(bad)


def test_set_threads():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_precisions():
    assert precision_dtype("fp32") == torch.float32 and precision_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose one of fp32, bf16"):
        precision_dtype("fp8")
    assert isinstance(native_bf16(), bool)


def test_release_memory_is_safe_to_call():
    release_memory()
    release_memory()
