"""Layer freezing and gradient checkpointing, for both architectures."""
import pytest
import torch

from bge.errors import UserError
from bge.loss import info_nce
from bge.lstm import BiLSTMEncoder, LSTMConfig
from bge.model import Encoder, ModelConfig
from bge.optim import freeze, make_optimizer


def make(arch: str, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "bert":
        return Encoder(ModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                                   hidden_dropout=dropout, attention_dropout=dropout))
    return BiLSTMEncoder(LSTMConfig(embed_size=24, hidden_size=8, num_layers=3, dim=16, dropout=dropout))


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (6, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2:, 9:] = 0
    mask[4:, 5:] = 0
    return ids, mask


def loss_of(model):
    ids, mask = inputs()
    q, p = model.embed(ids[:3], mask[:3]), model.embed(ids[3:], mask[3:])
    return info_nce(q, p, torch.arange(3), 0.05)[0]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the BiLSTM's recurrence is many times faster on one thread of a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch", ["bert", "bilstm"])
def test_frozen_weights_do_not_change_after_a_step(arch):
    model = make(arch).train()
    n = freeze(model, embeddings=True, layers=2)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(k.startswith(("emb.", "layers.0.", "layers.1.")) for k in frozen)
    assert n == sum(p.numel() for k, p in model.named_parameters() if k in frozen)
    assert any(k.startswith("layers.2.") for k, p in model.named_parameters() if p.requires_grad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)  # decay would move frozen weights if they were in it
    loss_of(model).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not changed & frozen
    # the gated pool's score bias shifts every token's score alike, so the softmax gives it no gradient: exactly
    # zero on some runs (it stays put), rounding noise on others (Adam moves it); no other weight may stay put
    still = {k for k, p in model.named_parameters() if p.requires_grad and not p.grad.any()}
    assert still <= {"pool.w.bias"}
    assert changed == {k for k, p in model.named_parameters() if p.requires_grad} - still


@pytest.mark.parametrize("arch", ["bert", "bilstm"])
def test_freeze_embeddings_alone_and_too_many_layers(arch):
    model = make(arch)
    freeze(model, embeddings=True)
    assert {k.split(".")[0] for k, p in model.named_parameters() if not p.requires_grad} == {"emb"}
    with pytest.raises(UserError, match="--freeze-layers 4: the model has 3 layers"):
        freeze(make(arch), layers=4)


@pytest.mark.parametrize("arch", ["bert", "bilstm"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointed_gradients_equal_plain_gradients(arch, dropout):
    # with dropout, checkpointing must replay the same masks in the recomputation (torch saves the RNG state)
    grads = {}
    for ckpt in (False, True):
        model = make(arch, dropout).train()
        model.grad_checkpointing = ckpt
        torch.manual_seed(1)
        loss_of(model).backward()
        grads[ckpt] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert max((grads[True][k] - grads[False][k]).abs().max().item() for k in grads[False]) <= 1e-6
    assert max(g.abs().max().item() for g in grads[False].values()) > 1e-4
