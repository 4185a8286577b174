"""Every loss against a naive reference: InfoNCE with false-negative masking, CoSENT, cosine-MSE, the classification
label mask, the head's cross-entropy, the L1 penalty, and the distillation terms."""
import math

import pytest
import torch
import torch.nn.functional as F

from bge.loss import (cosent, cosine_mse, distill_loss, embedding_distill, false_negative_mask, head_cross_entropy,
                      info_nce, l1_penalty, label_mask, matryoshka, pair_order_accuracy, similarity_kl,
                      teacher_score_kl, truncate)


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


def batch(seed=0, dim=16, shared=False):
    """4 queries, group size 3, with a duplicated passage text that is query 0's positive elsewhere in the batch.
    shared: query 1 also counts query 0's positive among its own (two queries sharing a positive, one way only)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(4, dim, generator=g), dim=1)
    p = F.normalize(torch.randn(12, dim, generator=g), dim=1)
    texts = [f"t{j}" for j in range(12)]
    texts[7] = texts[0]  # query 2 brought query 0's positive as a hard negative: a false negative for query 0
    texts[10] = "t3"     # query 3 brought query 1's positive too
    positives = [{"t0", "t5"}, {"t3"} | ({"t0"} if shared else set()), {"t6"}, {"t9"}]  # query 0: t5 in its own group
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
@pytest.mark.parametrize("masked", [False, True, "shared"])
def test_info_nce_equals_naive_loop_with_gradients(in_batch, symmetric, masked):
    q, p, texts, positives, pos_index, owner = batch(shared=masked == "shared")
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


def test_a_shared_positive_masks_the_passage_to_query_term_the_right_way_round():
    """Query 1 counts query 0's positive (t0) among its positives, not the other way: in the passage-to-query term,
    positive 0 must not be pushed away from query 1, while positive 1 is still pushed away from query 0."""
    q, p, texts, positives, pos_index, owner = batch(shared=True)
    mask = torch.tensor(naive_mask(texts, positives, pos_index.tolist()))
    assert mask[1, 0] and not mask[0, 3]  # one way only
    moved = q.clone()
    moved[1] = p[0]  # query 1 on top of positive 0: unmasked, this would dominate positive 0's softmax
    forward_only, _ = info_nce(moved, p, pos_index, 0.05, mask=mask)
    both, _ = info_nce(moved, p, pos_index, 0.05, mask=mask, symmetric=True)
    back = 2 * both - forward_only  # the passage-to-query term alone
    ref = naive_info_nce(moved, p, pos_index, 0.05, mask.tolist(), True, owner.tolist(), True) * 2 - \
        naive_info_nce(moved, p, pos_index, 0.05, mask.tolist(), True, owner.tolist(), False)
    assert torch.allclose(back, ref, atol=1e-5)


def test_without_in_batch_negatives_a_rank_sees_its_queries_groups_at_their_global_offset():
    """Under torchrun, p holds every rank's passages and `owner` counts queries globally: this rank's queries 2 and 3
    see the passages owned by global queries 2 and 3 (query_offset 2), not those of 0 and 1."""
    q, p, texts, positives, pos_index, owner = batch()
    local = q[2:].clone().requires_grad_()
    loss, _ = info_nce(local, p, pos_index[2:], 0.05, owner=owner, in_batch=False, query_offset=2)
    none = [[False] * len(p) for _ in range(2)]
    ref = naive_info_nce(q[2:], p, pos_index[2:], 0.05, none, False, (owner - 2).tolist(), False)
    assert torch.isfinite(loss) and torch.allclose(loss, ref, atol=1e-5)


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


# ---- STS: CoSENT and cosine-MSE ---------------------------------------------------------------------------------
def naive_cosent(cos, gold, scale):
    """log(1 + sum over every ordered pair (i, j), gold_i > gold_j, of exp(scale * (cos_j - cos_i))), term by term."""
    total = torch.tensor(1.0, dtype=torch.float64)
    for i in range(len(cos)):
        for j in range(len(cos)):
            if gold[i] > gold[j]:
                total = total + torch.exp(scale * (cos[j] - cos[i]).double())
    return torch.log(total)


def test_cosent_equals_naive_with_gradients_and_ties():
    g = torch.Generator().manual_seed(3)
    gold = torch.tensor([0.0, 1.5, 1.5, 3.0, 4.2, 5.0, 2.0, 0.0])  # ties: not an ordered pair either way
    cos = (torch.rand(8, generator=g) * 2 - 1).double()
    a, b = cos.clone().requires_grad_(), cos.clone().requires_grad_()
    loss, ref = cosent(a, gold.double(), 20.0), naive_cosent(b, gold, 20.0)
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-10)
    loss.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-10)


def test_cosent_sees_only_the_order_of_the_gold_scores():
    cos = torch.tensor([0.1, 0.7, 0.3, 0.9])
    gold = torch.tensor([0.0, 2.0, 1.0, 5.0])
    assert torch.allclose(cosent(cos, gold), cosent(cos, gold ** 3 + 7))  # same order, other scale
    right_order = cosent(torch.tensor([0.1, 0.5, 0.3, 0.9]), gold)
    wrong_order = cosent(torch.tensor([0.9, 0.3, 0.5, 0.1]), gold)
    assert right_order < 0.1 < wrong_order
    assert cosent(cos, torch.ones(4)).item() == 0.0  # no ordered pair: log(1)
    assert pair_order_accuracy(torch.tensor([0.1, 0.5, 0.3, 0.9]), gold).item() == 1.0
    assert pair_order_accuracy(torch.tensor([0.9, 0.3, 0.5, 0.1]), gold).item() == 0.0


def test_cosine_mse_equals_mean_of_squares():
    cos, target = torch.tensor([0.2, 0.9, -0.1]), torch.tensor([0.0, 1.0, 0.5])
    assert math.isclose(cosine_mse(cos, target).item(), ((0.2 ** 2) + (0.1 ** 2) + (0.6 ** 2)) / 3, rel_tol=1e-6)


# ---- classification: the label mask ---------------------------------------------------------------------------
def test_label_mask_equals_naive_and_masks_same_label_in_batch_negatives():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    mask = label_mask(labels, labels, torch.arange(6))
    naive = [[labels[i] == labels[j] and i != j for j in range(6)] for i in range(6)]
    assert mask.tolist() == naive
    assert mask[0, 2] and mask[0, 5] and not mask[0, 0] and not mask[0, 1]
    # in the loss: anchor 0's same-label partners (2 and 5) may be anything; other labels' texts are its negatives
    g = torch.Generator().manual_seed(1)
    q, p = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    one, _ = info_nce(q[:1], p, torch.tensor([0]), 0.05, mask=mask[:1])
    moved = p.clone()
    moved[2], moved[5] = q[0], q[0]  # same-label texts made identical to the anchor: not pushed away
    assert torch.allclose(one, info_nce(q[:1], moved, torch.tensor([0]), 0.05, mask=mask[:1])[0])
    moved = p.clone()
    moved[1] = q[0]  # an other-label text made identical to the anchor: a harder negative, a larger loss
    assert info_nce(q[:1], moved, torch.tensor([0]), 0.05, mask=mask[:1])[0] > one


def test_masked_classification_loss_equals_naive_loop():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    g = torch.Generator().manual_seed(2)
    q, p = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    excluded = [[labels[i] == labels[j] and i != j for j in range(6)] for i in range(6)]
    loss, _ = info_nce(q, p, torch.arange(6), 0.05, mask=label_mask(labels, labels, torch.arange(6)))
    ref = naive_info_nce(q, p, torch.arange(6), 0.05, excluded, True, list(range(6)), False)
    assert torch.allclose(loss, ref, atol=1e-5)


def test_head_cross_entropy_and_l1():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w, b = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.zeros(2)
    loss, acc = head_cross_entropy(emb, w, b, torch.tensor([0, 1]))
    assert math.isclose(loss.item(), -math.log(math.exp(2) / (math.exp(2) + 1)), rel_tol=1e-6) and acc.item() == 1.0
    params = [torch.tensor([[1.0, -2.0]], requires_grad=True), torch.tensor([[-0.5], [3.0]], requires_grad=True)]
    penalty = l1_penalty(params)
    assert penalty.item() == 6.5
    penalty.backward()  # the gradient of lambda * sum |w| is lambda * sign(w)
    assert params[0].grad.tolist() == [[1.0, -1.0]] and params[1].grad.tolist() == [[-1.0], [1.0]]


# ---- distillation -------------------------------------------------------------------------------------------
def naive_kl(qs, ps, qt, pt, temperature, excluded):
    """Per query: sum over the passages it sees of p_t * (log p_t - log p_s), softmax over those passages only."""
    total = 0.0
    for i in range(len(qs)):
        seen = [j for j in range(len(ps)) if not excluded[i][j]]
        log_s = torch.log_softmax(torch.stack([qs[i] @ ps[j] / temperature for j in seen]), 0)
        log_t = torch.log_softmax(torch.stack([qt[i] @ pt[j] / temperature for j in seen]), 0)
        total = total + sum(log_t[k].exp() * (log_t[k] - log_s[k]) for k in range(len(seen)))
    return total / len(qs)


def student_teacher(seed=1, dim=16):
    q, p, texts, positives, pos_index, _ = batch(seed=0, dim=dim)
    g = torch.Generator().manual_seed(seed)
    qt = F.normalize(q + 0.5 * torch.randn(q.shape, generator=g), dim=1)
    pt = F.normalize(p + 0.5 * torch.randn(p.shape, generator=g), dim=1)
    return q, p, qt, pt, naive_mask(texts, positives, pos_index.tolist())


@pytest.mark.parametrize("masked", [False, True])
def test_similarity_kl_equals_naive_loop_with_gradients(masked):
    q, p, qt, pt, excluded = student_teacher()
    if not masked:
        excluded = [[False] * len(p) for _ in range(len(q))]
    mask = torch.tensor(excluded) if masked else None
    q1, p1 = q.clone().requires_grad_(), p.clone().requires_grad_()
    q2, p2 = q.clone().requires_grad_(), p.clone().requires_grad_()
    kl = similarity_kl(q1, p1, qt, pt, 0.05, mask)
    ref = naive_kl(q2, p2, qt, pt, 0.05, excluded)
    assert torch.allclose(kl, ref, atol=1e-5, rtol=1e-5) and kl > 0
    kl.backward()
    ref.backward()
    assert torch.isfinite(q1.grad).all() and torch.isfinite(p1.grad).all()
    assert torch.allclose(q1.grad, q2.grad, atol=1e-5) and torch.allclose(p1.grad, p2.grad, atol=1e-5)
    assert similarity_kl(qt, pt, qt, pt, 0.05, mask).abs() < 1e-6  # a student that equals its teacher: zero


def test_embedding_distill_cosine_and_mse_against_naive():
    q, p, qt, pt, _ = student_teacher()
    s, t = 3 * torch.cat([q, p]), torch.cat([qt, pt])  # unnormalised student: both terms compare directions
    cos = [float(s[i] @ t[i] / (s[i].norm() * t[i].norm())) for i in range(len(s))]
    assert embedding_distill(s, t, "cosine").item() == pytest.approx(sum(1 - c for c in cos) / len(s), abs=1e-6)
    mse = sum(float(((s[i] / s[i].norm() - t[i]) ** 2).sum()) for i in range(len(s))) / s.numel()
    assert embedding_distill(s, t, "mse").item() == pytest.approx(mse, abs=1e-7)
    assert embedding_distill(s, t, "mse").item() == pytest.approx(2 * embedding_distill(s, t).item() / s.shape[1], abs=1e-6)
    with pytest.raises(ValueError):
        embedding_distill(s, t, "l1")


def test_distill_loss_is_the_weighted_sum_of_its_terms():
    q, p, qt, pt, excluded = student_teacher()
    mask = torch.tensor(excluded)
    student, teacher = {"q": q, "p": p}, {"q": qt, "p": pt}
    emb = embedding_distill(torch.cat([q, p]), torch.cat([qt, pt]))
    kl = similarity_kl(q, p, qt, pt, 0.1, mask)
    got = distill_loss(student, teacher, weight=0.3, kl_weight=2.0, temperature=0.1, mask=mask)
    assert torch.allclose(got, 0.3 * emb + 2.0 * kl)
    assert torch.allclose(distill_loss(student, teacher, kind="none", kl_weight=2.0, temperature=0.1, mask=mask), 2 * kl)
    assert torch.allclose(distill_loss(student, teacher, kl_weight=0.0), emb)


# ---- teacher scores ----------------------------------------------------------------------------------
def naive_group_kl(q, p, owner, teacher, temperature, teacher_temperature):
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
    loss = teacher_score_kl(q1, p1, owner, teacher, 0.05, 0.02)
    ref = naive_group_kl(q2, p2, owner.tolist(), teacher, 0.05, 0.02)
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
    loss = teacher_score_kl(q, p, owner, teacher, temperature, teacher_temperature)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and q.grad.abs().max().item() < 1e-5
    assert teacher_score_kl(q, p, owner, teacher.flip(0), temperature, teacher_temperature).item() > 1e-3


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


# ---- the retrieval task's loss on an assembled batch ------------------------------------------------------
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
def test_retrieval_loss_of_an_assembled_batch_equals_the_naive_loop(in_batch, symmetric):
    """bge.tasks.retrieval_loss on a batch from make_batch (false negatives by text, a positive two queries share)
    against the naive loop: the wiring of mask, owner, temperature and flags, not only info_nce."""
    from bge.batching import make_batch
    from bge.config import TrainConfig
    from bge.data import Example
    from bge.tasks import retrieval_loss
    ex = [Example(f"q{i}", [f"pos {i}"] + (["pos 0"] if i == 1 else []), [f"neg {i} {k}" for k in range(3)])
          for i in range(4)]
    ex[2].neg[0] = "pos 0"  # query 2 brings query 0's positive as a hard negative
    b = make_batch(ex, [0, 1, 2, 3], group_size=3, seed=0, epoch=0)
    g = torch.Generator().manual_seed(3)
    emb = {"q": F.normalize(torch.randn(4, 8, generator=g), dim=1),
           "p": F.normalize(torch.randn(len(b.passages), 8, generator=g), dim=1)}
    cfg = TrainConfig(temperature=0.05, in_batch_negatives=in_batch, symmetric=symmetric)
    loss, _ = retrieval_loss(emb, b, cfg)
    excluded = naive_mask(b.passages, [set(e.pos) for e in ex], b.pos_index.tolist())
    assert sum(map(sum, excluded)) >= 2  # the masks matter here
    ref = naive_info_nce(emb["q"], emb["p"], b.pos_index, 0.05, excluded, in_batch, b.owner.tolist(), symmetric)
    assert torch.allclose(loss, ref, atol=1e-5)
