"""The held-out split, the deterministic sampler and batch assembly."""
from collections import Counter

import torch

from bge.batching import Sampler, make_batch, normalise, split_queries, text_hash
from bge.data import Example


def examples(n=100, shared_every=10):
    """n queries; every `shared_every`-th pair of queries shares a positive passage."""
    out = []
    for i in range(n):
        pos = [f"passage {i}"] + ([f"shared {i // shared_every}"] if i % shared_every < 2 else [])
        out.append(Example(f"query {i}", pos, [f"neg {i} {k}" for k in range(i % 5)], qid=str(i)))
    return out


def test_text_hash_is_stable_and_normalised():
    assert text_hash("A  passage\n") == 3675865449319588078  # pinned: hashes must not change between runs or versions
    assert text_hash("a passage") == text_hash(" A PASSAGE ")
    assert text_hash("a passage") != text_hash("another passage")
    assert normalise("  Ünïcode\tTEXT ") == "ünïcode text"


def test_split_is_deterministic_sized_and_never_crosses_a_shared_positive():
    ex = examples()
    a = split_queries(ex, 0.15, 0.15, seed=1)
    assert a == split_queries(ex, 0.15, 0.15, seed=1)
    assert a != split_queries(ex, 0.15, 0.15, seed=2)
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(100))
    assert 14 <= len(a["test"]) <= 17 and 14 <= len(a["val"]) <= 17
    where = {i: name for name, idx in a.items() for i in idx}
    for g in range(10):  # queries 10g and 10g+1 share "shared g": same split
        assert where[10 * g] == where[10 * g + 1]


def test_split_keeps_repeated_query_text_together():
    ex = [Example("same question", [f"p{i}"]) for i in range(5)] + [Example(f"q{i}", [f"x{i}"]) for i in range(45)]
    for seed in range(5):
        s = split_queries(ex, 0.2, 0.2, seed)
        assert len({name for name, idx in s.items() for i in idx if i < 5}) == 1


def test_sampler_epochs_cover_everything_once_and_are_reproducible():
    ex = examples(50)
    s = Sampler(ex, 8, seed=3)
    assert len(s) == 7
    e0, e1 = s.epoch_batches(0), s.epoch_batches(1)
    assert sorted(i for b in e0 for i in b) == list(range(50)) and e0 != e1
    assert Sampler(ex, 8, seed=3).epoch_batches(1) == e1
    steps = [Sampler(ex, 8, seed=3).batch(m) for m in range(20)]  # a fresh sampler per step: resume anywhere
    assert steps[:7] == [(0, b) for b in e0] and steps[7:14] == [(1, b) for b in e1]


def test_a_batch_never_holds_the_same_query_twice():
    ex = [Example(f"q{i % 6}", [f"p{i}"]) for i in range(60)]  # each query text 10 times
    s = Sampler(ex, 4, seed=0)
    for epoch in range(3):
        batches = s.epoch_batches(epoch)
        assert Counter(i for b in batches for i in b) == Counter(range(60))
        for b in batches:
            assert len({ex[i].query for i in b}) == len(b) <= 4


def test_make_batch_layout_and_negative_sampling():
    ex = [Example("q0", ["a", "b"], ["n1"]), Example("q1", ["c"], ["m1", "m2", "m3", "m4"]), Example("q2", ["d"], [])]
    b = make_batch(ex, [0, 1, 2], group_size=4, seed=0, epoch=0)
    assert b.pos_index.tolist() == [0, 4, 8]
    assert b.owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert b.passages[0] in ("a", "b") and b.passages[1:4] == ["n1"] * 3  # too few negatives: repeated
    assert len(set(b.passages[5:8])) == 3 and set(b.passages[5:8]) <= {"m1", "m2", "m3", "m4"}  # drawn without repeats
    assert b.passages[8] == "d"  # no negatives: in-batch only
    assert b.query_pos_hashes.shape == (3, 2) and b.query_pos_hashes[1, 1] == -1
    assert b.query_texts("Q: ") == ["Q: q0", "Q: q1", "Q: q2"]
    again = make_batch(ex, [0, 1, 2], group_size=4, seed=0, epoch=0)
    assert again.passages == b.passages
    draws = {tuple(make_batch(ex, [1], group_size=3, seed=0, epoch=e).passages) for e in range(20)}
    assert len(draws) > 3  # each epoch draws anew


def test_teacher_scores_follow_the_sampled_passages():
    ex = [Example("q", ["a", "b"], ["x", "y", "z"], pos_scores=[1.0, 2.0], neg_scores=[0.1, 0.2, 0.3])]
    b = make_batch(ex, [0], group_size=3, seed=5, epoch=0)
    table = {"a": 1.0, "b": 2.0, "x": 0.1, "y": 0.2, "z": 0.3}
    assert torch.allclose(b.teacher_scores, torch.tensor([table[p] for p in b.passages]))


def test_prefetcher_yields_in_order_from_any_start_and_forwards_errors():
    import pytest

    from bge.batching import Prefetcher

    def build(m):
        if m == 7:
            raise ValueError("bad line 7")
        return m * m

    p = Prefetcher(build, start=3)
    assert [p.get(m) for m in range(3, 7)] == [9, 16, 25, 36]
    with pytest.raises(ValueError, match="bad line 7"):
        p.get(7)


def test_flagembedding_types_size_the_group_and_instruct_symmetric_passages(tmp_path):
    """As FlagEmbedding's training data: only_1neg brings one negative whatever the group size, symmetric_class at most
    the negatives it has (never repeated), symmetric_sts/_clustering put the query instruction on the passages too."""
    import json

    from bge.data import load_examples
    lines = [{"query": "q0", "pos": ["p0"], "neg": ["a", "b", "c"], "type": "only_1neg"},
             {"query": "q1", "pos": ["p1"], "neg": ["d"], "type": "symmetric_class"},
             {"query": "q2", "pos": ["p2"], "neg": ["e"], "type": "normal"},
             {"query": "q3", "pos": ["p3"], "neg": ["f"], "type": "symmetric_sts", "prompt": "Same meaning: "},
             {"query": "q4", "pos": ["p4"], "neg": ["g", "h"], "type": "symmetric_clustering"},
             {"query": "q5", "pos": ["p5"], "neg": ["i"]}]
    path = tmp_path / "types.jsonl"
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    ex, _ = load_examples(path)
    assert [e.kind for e in ex] == ["only_1neg", "symmetric_class", "normal", "symmetric_sts", "symmetric_clustering", ""]
    b = make_batch(ex, list(range(6)), group_size=4, seed=0, epoch=0)
    sizes = Counter(b.owner.tolist())
    assert [sizes[i] for i in range(6)] == [2, 2, 4, 4, 4, 4]  # normal lines repeat their negatives, as FlagEmbedding
    texts = b.passage_texts("Q: ", "P: ")
    by_owner = lambda i: [t for t, o in zip(texts, b.owner.tolist()) if o == i]
    assert all(t.startswith("Same meaning: ") for t in by_owner(3)) and all(t.startswith("Q: ") for t in by_owner(4))
    assert all(t.startswith("P: ") and t.count(": ") == 1 for i in (0, 1, 2, 5) for t in by_owner(i))  # the passage one
    assert b.query_texts("Q: ")[3] == "Same meaning: q3" and b.passages == [t.split(": ")[-1] for t in texts]
    plain = make_batch(ex, [0, 2, 5], group_size=4, seed=0, epoch=0)  # no symmetric line
    assert plain.passage_texts("Q: ", "P: ") == ["P: " + t for t in plain.passages]


def test_each_query_draws_one_of_its_positives_by_seed_epoch_and_index():
    """The positive is drawn, not always the first: over epochs every positive of a line is used, and the draw is a
    pure function of (seed, epoch, index), so a resumed run sees the same one."""
    ex = [Example("q", ["first", "second", "third"]), Example("r", ["only"])]
    drawn = Counter()
    for epoch in range(30):
        b = make_batch(ex, [0, 1], group_size=1, seed=7, epoch=epoch)
        drawn[b.passages[b.pos_index[0]]] += 1
        assert b.passages == make_batch(ex, [0, 1], group_size=1, seed=7, epoch=epoch).passages
    assert set(drawn) == {"first", "second", "third"} and min(drawn.values()) >= 5
