import pytest
import torch

from ctxvec.model.pooling import POOLING_MODES, Pooling


def reference(hidden: torch.Tensor, lengths: list[int], mode: str, normalize: bool) -> torch.Tensor:
    """Text by text, in float64: the mean, first row or maximum of its real tokens (0 if none)."""
    out = []
    for h, n in zip(hidden.double(), lengths):
        if n == 0:
            out.append(torch.zeros(h.shape[-1], dtype=torch.float64))
            continue
        real = h[:n]
        v = {"mean": real.mean(0), "cls": real[0], "max": real.max(0).values}[mode]
        out.append(v / v.norm().clamp(min=1e-12) if normalize else v)
    return torch.stack(out)


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lengths", [[5, 2, 7, 1], [3, 0, 4, 0], [0, 0]], ids=["texts", "some-empty", "all-empty"])
def test_pooling_counts_real_tokens_only(mode, normalize, lengths):
    torch.manual_seed(0)
    T = max(max(lengths), 1)
    hidden = torch.randn(len(lengths), T, 6) * 3  # padding holds values too: they must not count
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    expected = reference(hidden, lengths, mode, normalize)
    padded = Pooling(mode, normalize)(hidden, mask.long())
    rows = Pooling(mode, normalize).pool_rows(hidden[mask], torch.tensor(lengths))  # the real rows, text after text
    for got in (padded, rows):
        assert got.shape == (len(lengths), 6) and got.dtype == torch.float32
        assert (got.double() - expected).abs().max().item() < 1e-6
    assert all(not padded[i].any() for i, n in enumerate(lengths) if n == 0)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_passes_gradients_to_the_real_tokens(mode):
    torch.manual_seed(1)
    hidden = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda h: Pooling(mode, normalize=True)(h, mask), (hidden,))
    Pooling(mode)(hidden, mask).sum().backward()
    assert not hidden.grad[mask == 0].any()


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="pooling mode"):
        Pooling("sum")
