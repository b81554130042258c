"""relbert_ds.model.pooling: the relation vector of a 16-bit backbone is pooled in fp32."""
import pytest
import torch

from relbert_ds.model.pooling import POOLING_MODES, pool, token_weights


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_hidden_states_are_pooled_in_fp32(mode, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(3, 7, 16, generator=g) * 4).to(dtype)
    ids = torch.randint(5, 50, (3, 7), generator=g)
    ids[:, 2] = 4  # the mask token
    attention = torch.ones(3, 7, dtype=torch.long)
    attention[1, 5:] = 0  # padding
    out = pool(hidden, ids, attention, mode, mask_token_id=4)
    weights = token_weights(ids, attention, mode, 4).double()
    exact = torch.einsum("bl,blh->bh", weights, hidden.double()) / weights.sum(1, keepdim=True)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-6)
    if mode.startswith("average"):  # a mean of several tokens: rounded to 16 bits it fails the bound above
        assert not torch.allclose(exact.to(dtype).double(), exact, rtol=1e-6, atol=1e-6)


def test_fp64_stays_fp64():
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    ids, attention = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    assert pool(hidden, ids, attention, "average", None).dtype == torch.float64
