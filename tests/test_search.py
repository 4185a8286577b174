import pytest
import torch

from bge.search import _chunk_topk, topk_search


def reference(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable descending sort of the full score matrix: ties go to the lower corpus index."""
    scores = queries.float() @ corpus.float().T
    vals, idx = scores.sort(dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def quantised(n: int, dim: int, levels: int, seed: int) -> torch.Tensor:
    """Entries are multiples of 1/levels in [-1, 1]: dot products are exact in any summation order, and repeat."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels + 1, (n, dim), generator=g).float() / levels


def assert_same(got, want):
    assert got[0].shape == want[0].shape and got[0].device.type == "cpu"
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


def test_random_data():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(37, 16, generator=g), torch.randn(1000, 16, generator=g)
    got = topk_search(q, c, 10, corpus_chunk=128, query_chunk=8)
    want = reference(q, c, 10)
    # Blocked matmuls may round differently from the full one, so compare scores to float tolerance.
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize(
    "k, corpus_chunk, query_chunk",
    [(10, 100, 7), (10, 1000, 1000), (150, 64, 16), (1, 33, 5), (700, 100, 64), (5000, 128, 32)],
)
def test_many_ties(k, corpus_chunk, query_chunk):
    # Entries in {-1, 0, 1} in 2 dims give only 5 distinct scores over 600 docs, so the k-th score is tied in
    # every row and across chunk boundaries; k=150 is more than a chunk and k=5000 more than the corpus.
    q, c = quantised(50, 2, 1, seed=1), quantised(600, 2, 1, seed=2)
    got = topk_search(q, c, k, corpus_chunk=corpus_chunk, query_chunk=query_chunk)
    assert_same(got, reference(q, c, k))
    assert got[0].shape == (50, min(k, 600))


def test_all_scores_equal():
    q, c = torch.ones(4, 8), torch.zeros(300, 8)
    got = topk_search(q, c, 20, corpus_chunk=64, query_chunk=3)
    assert_same(got, reference(q, c, 20))
    assert got[1][0].tolist() == list(range(20))


def test_chunk_topk_fixes_topk_ties():
    # Every column ties with the k-th value, so torch.topk's choice among them is arbitrary.
    scores = torch.tensor([[1.0, 2.0, 1.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    vals, idx = _chunk_topk(scores, 3)
    assert idx.tolist() == [[1, 4, 0], [5, 0, 1]]
    assert vals.tolist() == [[2.0, 2.0, 1.0], [3.0, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_scored_in_float32(dtype):
    q, c = quantised(20, 32, 2, seed=3).to(dtype), quantised(500, 32, 2, seed=4).to(dtype)
    got = topk_search(q, c, 25, corpus_chunk=100, query_chunk=6)
    assert got[0].dtype == torch.float32
    assert_same(got, reference(q, c, 25))


def test_edge_shapes():
    c = torch.randn(10, 4)
    s, i = topk_search(torch.empty(0, 4), c, 3)
    assert s.shape == i.shape == (0, 3)
    s, i = topk_search(torch.randn(2, 4), torch.empty(0, 4), 3)
    assert s.shape == i.shape == (2, 0)
    with pytest.raises(ValueError, match="same dim"):
        topk_search(torch.randn(2, 5), c, 3)
    with pytest.raises(ValueError, match="positive"):
        topk_search(torch.randn(2, 4), c, 0)
