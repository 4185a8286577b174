"""The contrastive loss against a naive per-query loop, including false-negative masking."""
import math

import pytest
import torch
import torch.nn.functional as F

from bge.loss import distill_kl, false_negative_mask, info_nce, matryoshka, truncate


def naive_info_nce(q, p, pos_index, temperature, excluded, in_batch, owner, symmetric):
    """One query at a time: -log softmax of its positive among the passages it may see."""
    total = 0.0
    for i in range(len(q)):
        seen = [j for j in range(len(p)) if (in_batch or owner[j] == i) and not excluded[i][j]]
        logits = torch.stack([q[i] @ p[j] / temperature for j in seen])
        total = total - torch.log_softmax(logits, 0)[seen.index(int(pos_index[i]))]
    loss = total / len(q)
    if not symmetric:
        return loss
    back = 0.0
    for i in range(len(q)):  # positive i against the queries that do not also own its text as a positive
        seen = [j for j in range(len(q)) if (in_batch or j == i) and (j == i or not excluded[j][int(pos_index[i])])]
        logits = torch.stack([p[int(pos_index[i])] @ q[j] / temperature for j in seen])
        back = back - torch.log_softmax(logits, 0)[seen.index(i)]
    return (loss + back / len(q)) / 2


def naive_mask(passage_texts, query_positive_texts, pos_index):
    return [[passage_texts[j] in query_positive_texts[i] and j != pos_index[i] for j in range(len(passage_texts))]
            for i in range(len(query_positive_texts))]


def batch(seed=0, dim=16):
    """4 queries, group size 3, with a duplicated passage text that is query 0's positive elsewhere in the batch."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(4, dim, generator=g), dim=1)
    p = F.normalize(torch.randn(12, dim, generator=g), dim=1)
    texts = [f"t{j}" for j in range(12)]
    texts[7] = texts[0]  # query 2 brought query 0's positive as a hard negative: a false negative for query 0
    texts[10] = "t3"     # query 3 brought query 1's positive too
    positives = [{"t0", "t5"}, {"t3"}, {"t6"}, {"t9"}]  # query 0 has a second positive (t5) inside its own group
    pos_index = torch.tensor([0, 3, 6, 9])
    owner = torch.arange(4).repeat_interleave(3)
    return q, p, texts, positives, pos_index, owner


def hashes(texts):
    return torch.tensor([abs(hash(t)) % (1 << 62) for t in texts])


def test_mask_equals_naive():
    _, _, texts, positives, pos_index, _ = batch()
    h = {t: abs(hash(t)) % (1 << 62) for t in texts + [t for s in positives for t in s]}
    qpos = torch.tensor([[h[t] for t in sorted(s)] + [-1] * (2 - len(s)) for s in positives])
    mask = false_negative_mask(torch.tensor([h[t] for t in texts]), qpos, pos_index)
    assert mask.tolist() == naive_mask(texts, positives, pos_index.tolist())
    assert mask[0, 7] and mask[0, 5] and mask[1, 10] and not mask[0, 0] and mask.sum() == 3


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_info_nce_equals_naive_loop_with_gradients(in_batch, symmetric, masked):
    q, p, texts, positives, pos_index, owner = batch()
    excluded = naive_mask(texts, positives, pos_index.tolist()) if masked else [[False] * 12 for _ in range(4)]
    mask = torch.tensor(excluded) if masked else None
    q1, p1 = q.clone().requires_grad_(), p.clone().requires_grad_()
    q2, p2 = q.clone().requires_grad_(), p.clone().requires_grad_()
    loss, acc = info_nce(q1, p1, pos_index, 0.05, mask=mask, owner=owner, in_batch=in_batch, symmetric=symmetric)
    ref = naive_info_nce(q2, p2, pos_index, 0.05, excluded, in_batch, owner.tolist(), symmetric)
    assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    ref.backward()
    assert torch.allclose(q1.grad, q2.grad, atol=1e-5) and torch.allclose(p1.grad, p2.grad, atol=1e-5)
    assert 0.0 <= acc.item() <= 1.0


def test_masking_changes_the_loss_and_ignores_masked_scores():
    q, p, texts, positives, pos_index, owner = batch()
    mask = torch.tensor(naive_mask(texts, positives, pos_index.tolist()))
    plain, _ = info_nce(q, p, pos_index, 0.05)
    masked, _ = info_nce(q, p, pos_index, 0.05, mask=mask)
    assert not torch.isclose(plain, masked)
    # query 0's masked passages (5 and 7) may be anything: its loss does not see them
    p2 = p.clone()
    p2[7], p2[5] = -p2[7], -p2[5]
    one, _ = info_nce(q[:1], p, pos_index[:1], 0.05, mask=mask[:1])
    one2, _ = info_nce(q[:1], p2, pos_index[:1], 0.05, mask=mask[:1])
    assert torch.allclose(one, one2)
    unmasked2, _ = info_nce(q[:1], p2, pos_index[:1], 0.05)
    assert not torch.isclose(unmasked2, info_nce(q[:1], p, pos_index[:1], 0.05)[0])


def test_perfect_separation_gives_zero_loss_and_full_accuracy():
    q = torch.eye(4)
    p = torch.eye(4)
    loss, acc = info_nce(q, p, torch.arange(4), 0.01)
    assert loss.item() < 1e-30 or math.isclose(loss.item(), 0.0, abs_tol=1e-30)
    assert acc.item() == 1.0


# ---- distillation ------------------------------------------------------------------------------------
def naive_kl(q, p, owner, teacher, temperature, teacher_temperature):
    """One query at a time: sum over its own group of t * (log t - log s)."""
    total = 0.0
    for i in range(len(q)):
        group = [j for j in range(len(p)) if owner[j] == i]
        s = torch.log_softmax(torch.stack([q[i] @ p[j] / temperature for j in group]), 0)
        t = torch.log_softmax(torch.stack([teacher[j] / teacher_temperature for j in group]), 0)
        total = total + (t.exp() * (t - s)).sum()
    return total / len(q)


def uneven_groups(seed=0, dim=16):
    """3 queries bringing 4, 1 and 3 passages (a line without negatives has a group of one)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(3, dim, generator=g), dim=1)
    p = F.normalize(torch.randn(8, dim, generator=g), dim=1)
    owner = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2])
    teacher = torch.rand(8, generator=g)
    return q, p, owner, teacher


def test_distill_kl_equals_naive_loop_with_gradients():
    q, p, owner, teacher = uneven_groups()
    q1, p1 = q.clone().requires_grad_(), p.clone().requires_grad_()
    q2, p2 = q.clone().requires_grad_(), p.clone().requires_grad_()
    loss = distill_kl(q1, p1, owner, teacher, 0.05, 0.02)
    ref = naive_kl(q2, p2, owner.tolist(), teacher, 0.05, 0.02)
    assert loss.item() > 0.01 and torch.allclose(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    ref.backward()
    assert torch.allclose(q1.grad, q2.grad, atol=1e-5) and torch.allclose(p1.grad, p2.grad, atol=1e-5)
    assert torch.isfinite(q1.grad).all() and torch.isfinite(p1.grad).all()


def test_distill_kl_is_zero_when_the_distributions_match():
    q, p, owner, _ = uneven_groups(seed=1)
    temperature, teacher_temperature = 0.05, 0.02
    # the teacher's logits equal the student's, up to the ratio of temperatures and a shift per group
    teacher = (q[owner] * p).sum(1) * teacher_temperature / temperature + 0.3 * owner
    q = q.clone().requires_grad_()
    loss = distill_kl(q, p, owner, teacher, temperature, teacher_temperature)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and q.grad.abs().max().item() < 1e-5
    assert distill_kl(q, p, owner, teacher.flip(0), temperature, teacher_temperature).item() > 1e-3


# ---- Matryoshka ----------------------------------------------------------------------------------------
def test_matryoshka_adds_the_loss_at_each_truncated_size():
    q, p, texts, positives, pos_index, owner = batch(dim=16)

    def loss_fn(emb):
        loss, acc = info_nce(emb["q"], emb["p"], pos_index, 0.05)
        return loss, {"acc": acc}

    total, stats = matryoshka(loss_fn, {"q": q, "p": p}, [16, 8, 4])
    expected = sum(info_nce(F.normalize(q[:, :d], dim=1), F.normalize(p[:, :d], dim=1), pos_index, 0.05)[0]
                   for d in (16, 8, 4))
    assert torch.allclose(total, expected, atol=1e-6)  # the full size is counted once
    assert torch.equal(stats["acc"], loss_fn({"q": q, "p": p})[1]["acc"])
    assert torch.equal(matryoshka(loss_fn, {"q": q, "p": p}, [])[0], loss_fn({"q": q, "p": p})[0])
    t = truncate(q, 4)
    assert t.shape == (4, 4) and torch.allclose(t.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="outside 1..16"):
        matryoshka(loss_fn, {"q": q, "p": p}, [32])
