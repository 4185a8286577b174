import math

import pytest
import torch

from bge.model import Encoder, ModelConfig
from bge.optim import decayed, default_lr, get_lr, make_optimizer, param_groups, step_if


def test_warmup_then_linear_decay():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110)
    assert get_lr(0, **kw) == pytest.approx(0.1)
    assert get_lr(9, **kw) == pytest.approx(1.0)
    assert get_lr(10, **kw) == pytest.approx(1.0)
    assert get_lr(60, **kw) == pytest.approx(0.5)
    assert get_lr(110, **kw) == pytest.approx(0.0)
    assert get_lr(500, **kw) == pytest.approx(0.0)  # past the end stays at the floor
    lrs = [get_lr(s, **kw) for s in range(110)]
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_linear_decay_ends_at_its_floor():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert get_lr(60, **kw) == pytest.approx(0.55) and get_lr(110, **kw) == pytest.approx(0.1)
    assert get_lr(10, **kw) == pytest.approx(1.0) and get_lr(500, **kw) == pytest.approx(0.1)


def test_cosine_constant_and_floor():
    kw = dict(lr=2.0, warmup_steps=0, total_steps=100)
    assert get_lr(0, schedule="cosine", **kw) == pytest.approx(2.0)
    assert get_lr(50, schedule="cosine", **kw) == pytest.approx(1.0)
    assert get_lr(25, schedule="cosine", **kw) == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert get_lr(100, schedule="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.2)
    assert get_lr(73, schedule="constant", **kw) == 2.0
    with pytest.raises(ValueError):
        get_lr(50, schedule="step", **kw)


def test_default_lr_by_model_size():
    assert default_lr(384) == 3e-5 and default_lr(768) == 2e-5 and default_lr(1024) == 1e-5


def test_no_decay_on_biases_and_layernorms():
    model = Encoder(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=50))
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "ln" not in n for n in map(names.get, map(id, decay["params"])))
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert any("ln" in names[id(p)] for p in no_decay["params"]) and any("bias" in names[id(p)] for p in no_decay["params"])
    model.emb.word.weight.requires_grad_(False)  # frozen parameters are left out of the optimiser
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_l1_applies_to_the_decayed_matrices_only_and_heads_get_their_own_lr():
    model = Encoder(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=50))
    decay, _ = param_groups(model, 0.01)
    assert [id(p) for p in decayed(model)] == [id(p) for p in decay["params"]]  # the same set as weight decay
    head = torch.nn.Linear(16, 3)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.01, extra=param_groups(head, 0.01, lr_scale=10.0))
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert scales == [1.0, 1.0, 10.0, 10.0] and opt.param_groups[2]["params"] == [head.weight]


def test_layer_lr_decay_gives_each_depth_its_rate_and_every_parameter_one_group():
    model = Encoder(ModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, vocab_size=50))
    names = {id(p): n for n, p in model.named_parameters()}
    plain = param_groups(model, 0.01)
    assert param_groups(model, 0.01, layer_decay=1.0) == plain and len(plain) == 2  # off: the two groups as before
    groups = param_groups(model, 0.01, lr_scale=10.0, layer_decay=0.5)
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(scale) == len(names)  # each parameter once
    depth = lambda n: 0 if n.startswith("emb.") else int(n.split(".")[1]) + 1
    assert all(scale[n] == 10.0 * 0.5 ** (2 - depth(n)) for n in scale)  # the top layer in full, the tables lowest
    assert {scale[n] for n in scale} == {10.0, 5.0, 2.5}
    decay = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert decay == {names[id(p)] for p in decayed(model)}  # decay still on the matrices only
    model.emb.word.weight.requires_grad_(False)
    assert "emb.word.weight" not in {names[id(p)] for g in param_groups(model, 0.01, layer_decay=0.5) for p in g["params"]}


def test_step_if_skips_without_a_trace_and_otherwise_is_the_plain_step():
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        return model, make_optimizer(model, lr=0.1, weight_decay=0.1)

    def backward(model, nan=False):
        model.zero_grad()
        model(torch.arange(8.0).view(2, 4)).pow(2).sum().backward()
        if nan:
            next(model.parameters()).grad[0, 0] = float("nan")

    model, opt = setup()
    ref, ref_opt = setup()
    for m, o in ((model, opt), (ref, ref_opt)):  # a first step, so there are moments and step counts to keep
        backward(m)
        o.step()
    backward(model, nan=True)
    step_if(opt, torch.tensor(False))  # as if it never happened...
    assert not hasattr(opt, "found_inf")
    backward(model)
    step_if(opt, torch.tensor(True))  # ...and this is the plain step
    backward(ref)
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    states = [(a, b) for sa, sb in zip(opt.state.values(), ref_opt.state.values()) for a, b in zip(sa.values(), sb.values())]
    assert len(states) == 4 * 3 and all(torch.equal(a, b) for a, b in states)  # step count, both moments
