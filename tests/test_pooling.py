"""Pooling on both layouts against a naive reference: [CLS] is the first token, mean is over the real tokens only,
and the packed path (real tokens only) pools exactly as the padded one."""
import pytest
import torch
import torch.nn.functional as F

from bge.model import Encoder, ModelConfig


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_and_padded_pooling_equal_a_naive_reference(pooling):
    torch.manual_seed(0)
    model = Encoder(ModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, vocab_size=50,
                                pooling=pooling)).eval()
    ids = torch.tensor([[2, 5, 7, 9, 0, 0], [2, 11, 12, 13, 14, 15], [2, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        padded, packed = model.embed(ids, mask), model.embed(ids, mask, packed=True)
        naive = []
        for row, m in zip(ids, mask):  # each sequence alone, unpadded: what its embedding must be
            states = model(row[m.bool()][None], torch.ones(1, int(m.sum()), dtype=torch.long))[0]
            naive.append(states[0] if pooling == "cls" else states.mean(0))
    naive = F.normalize(torch.stack(naive), dim=-1)
    assert torch.allclose(padded, naive, atol=1e-5) and torch.allclose(packed, naive, atol=1e-5)
    assert torch.allclose(padded.norm(dim=-1), torch.ones(3))
