"""Weight merging: the ends of the interpolation are the two models exactly; the ratio is chosen as documented."""
import pytest
import torch

from bge.embedder import Embedder
from bge.merge import choose_ratio, merge_state_dicts, merged_embedder, parse_ratios
from tests.conftest import make_tiny_model

TEXTS = ["how tight should a carbon seatpost clamp be", "Tubeless sealant dries out after a few months.",
         "x", "Chains stretch; measure them with a checker every 1,000 km and replace them before the cassette wears."]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, minilm_dir):
    """Two tiny models of one architecture with different weights: a 'base' and a 'fine-tuned'."""
    root = tmp_path_factory.mktemp("merge")
    return (Embedder.load(str(make_tiny_model(root / "base", minilm_dir, seed=1)), device="cpu"),
            Embedder.load(str(make_tiny_model(root / "tuned", minilm_dir, seed=2)), device="cpu"))


def test_merge_state_dicts_interpolates_and_hits_both_ends_exactly():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 3, generator=g), "h": torch.randn(4, generator=g).bfloat16(), "ids": torch.arange(4)}
    tuned = {"w": torch.randn(5, 3, generator=g), "h": torch.randn(4, generator=g).bfloat16(), "ids": torch.arange(4)}
    before = {k: v.clone() for k, v in base.items()}
    for ratio, ref in ((0.0, base), (1.0, tuned)):
        out = merge_state_dicts(base, tuned, ratio)
        assert all(torch.equal(out[k], ref[k]) and out[k].dtype == ref[k].dtype for k in ref)
    half = merge_state_dicts(base, tuned, 0.3)
    assert torch.allclose(half["w"], 0.7 * base["w"] + 0.3 * tuned["w"], atol=1e-6)
    assert half["h"].dtype == torch.bfloat16 and torch.equal(half["ids"], base["ids"])
    assert all(torch.equal(base[k], before[k]) for k in base)  # inputs untouched
    with pytest.raises(ValueError, match="different tensors"):
        merge_state_dicts(base, {"w": tuned["w"]}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        merge_state_dicts(base, {**tuned, "w": torch.zeros(3, 5)}, 0.5)


def test_ratio_0_embeds_as_the_base_model_and_1_as_the_fine_tuned_one(pair):
    base, tuned = pair
    eb, et = base.encode(TEXTS), tuned.encode(TEXTS)
    assert not (eb == et).all()
    assert (merged_embedder(base, tuned, 0.0).encode(TEXTS) == eb).all()
    assert (merged_embedder(base, tuned, 1.0).encode(TEXTS) == et).all()
    middle = merged_embedder(base, tuned, 0.5).encode(TEXTS)
    assert not (middle == eb).all() and not (middle == et).all()
    assert (tuned.encode(TEXTS) == et).all() and (base.encode(TEXTS) == eb).all()  # neither model changed


def test_merged_model_exports_and_reloads(pair, tmp_path):
    base, tuned = pair
    merged = merged_embedder(base, tuned, 0.4)
    merged.save(tmp_path / "merged")
    again = Embedder.load(str(tmp_path / "merged"), device="cpu")
    assert (again.encode(TEXTS) == merged.encode(TEXTS)).all()


def test_choose_ratio_prefers_domain_within_the_probe_tolerance():
    domain = {0.0: 0.60, 0.25: 0.64, 0.5: 0.66, 0.75: 0.68, 1.0: 0.69}
    probe = {0.0: 0.87, 0.25: 0.868, 0.5: 0.862, 0.75: 0.85, 1.0: 0.83}
    assert choose_ratio(domain, probe, tolerance=0.01) == 0.5
    assert choose_ratio(domain, probe, tolerance=0.05) == 1.0
    assert choose_ratio(domain, probe, tolerance=0.0) == 0.0  # the base model always qualifies
    assert choose_ratio(domain, None, tolerance=0.0) == 1.0
    assert choose_ratio({0.0: 0.5, 0.5: 0.7, 1.0: 0.7}, None, 0.0) == 0.5  # a tie goes nearer the base
    with pytest.raises(ValueError, match="ratio 0"):
        choose_ratio(domain, {0.5: 0.8}, 0.01)


def test_parse_ratios():
    assert parse_ratios("0.5, 0.25,0.5,1") == [0.25, 0.5, 1.0]
    for bad in ("", "0.5,x", "1.5", "-0.1"):
        with pytest.raises(ValueError):
            parse_ratios(bad)
