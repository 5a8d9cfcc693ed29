"""ACD against the literal float64 formula (Gera et al. 2023) and hand-made vectors."""
import math

import pytest
import torch

from moduleformer_exit.contrast import auto_contrastive_log_probs, auto_contrastive_log_probs_at_head


def literal_acd(upper, lower, alpha, minimum_candidates):
    """The formula as written, one position at a time, float64 Python."""
    p_up = torch.softmax(upper.double(), -1).tolist()
    p_low = torch.softmax(lower.double(), -1).tolist()
    threshold = min(alpha * max(p_up), sorted(p_up, reverse=True)[minimum_candidates - 1])
    head = [v for v, p in enumerate(p_up) if p >= threshold]
    mass = sum(p_up[v] for v in head)
    scores = {v: math.log(p_up[v]) - math.log(p_low[v]) for v in head}
    norm = sum(math.exp(s) for s in scores.values())
    out = [mass * math.exp(scores[v]) / norm if v in scores else p_up[v] for v in range(len(p_up))]
    return [math.log(p) for p in out]


@pytest.mark.parametrize("shape", [(1, 1, 20), (2, 3, 20), (1, 1, 50), (4, 20)])
@pytest.mark.parametrize("alpha, mc", [(0.1, 1), (0.5, 1), (0.1, 3), (0.9, 2)])
def test_matches_literal_formula(shape, alpha, mc):
    g = torch.Generator().manual_seed(hash((shape, alpha, mc)) % 1000)
    upper, lower = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2
    got = auto_contrastive_log_probs(upper, lower, alpha, mc)
    assert got.shape == upper.shape and got.dtype == torch.float32
    flat_up, flat_low, flat_got = upper.reshape(-1, shape[-1]), lower.reshape(-1, shape[-1]), got.reshape(-1, shape[-1])
    for row in range(flat_up.shape[0]):
        want = torch.tensor(literal_acd(flat_up[row], flat_low[row], alpha, mc), dtype=torch.float64)
        torch.testing.assert_close(flat_got[row].double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(shape[:-1]), atol=1e-5, rtol=0)


def test_hand_made_vector():
    # p_up = [0.5, 0.3, 0.15, 0.05], alpha 0.2 -> threshold 0.1 -> head {0, 1, 2}, mass 0.95.
    # p_low = [0.7, 0.1, 0.1, 0.1] -> scores exp: 0.5/0.7, 3, 1.5 -> normalised over head.
    p_up = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p_low = torch.tensor([0.7, 0.1, 0.1, 0.1])
    out = auto_contrastive_log_probs(p_up.log(), p_low.log(), alpha=0.2).exp()
    ratios = torch.tensor([0.5 / 0.7, 3.0, 1.5])
    expected_head = 0.95 * ratios / ratios.sum()
    torch.testing.assert_close(out[:3], expected_head, atol=1e-6, rtol=1e-6)
    assert out[3].item() == pytest.approx(0.05, abs=1e-7)  # outside the head: expert probability kept
    assert out.argmax().item() == 1  # greedy = argmax of log p_up - log p_low inside the head


def test_greedy_property_and_outside_head_unchanged():
    g = torch.Generator().manual_seed(0)
    upper, lower = torch.randn(64, 30, generator=g) * 3, torch.randn(64, 30, generator=g) * 3
    out = auto_contrastive_log_probs(upper, lower, alpha=0.1)
    p_up, p_low = upper.softmax(-1), lower.softmax(-1)
    head = p_up >= 0.1 * p_up.amax(-1, keepdim=True)
    score = torch.where(head, p_up.log() - p_low.log(), torch.tensor(float("-inf")))
    assert torch.equal(out.argmax(-1), score.argmax(-1))
    torch.testing.assert_close(out.exp()[~head], p_up[~head], atol=1e-7, rtol=1e-5)


def test_extreme_logits_stay_finite():
    upper = torch.tensor([[200.0, -200.0, 0.0]])
    lower = torch.tensor([[-300.0, 300.0, 0.0]])
    out = auto_contrastive_log_probs(upper, lower)
    assert not torch.isnan(out).any()
    assert out.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        auto_contrastive_log_probs(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="alpha"):
        auto_contrastive_log_probs(torch.zeros(5), torch.zeros(5), alpha=1.5)
    with pytest.raises(ValueError, match="minimum_candidates"):
        auto_contrastive_log_probs(torch.zeros(5), torch.zeros(5), minimum_candidates=6)


@pytest.mark.parametrize("alpha, mc, narrow", [(0.1, 1, True), (0.5, 4, True), (0.0, 1, False)])
def test_at_head_asks_only_for_head_candidates_and_matches_literal(alpha, mc, narrow):
    """The head-set form: lower logits requested at the C = max |H| most probable ids only (all of them when
    C > V / 4); a per-position constant offset of the lower logits (an unnormalised head) changes nothing."""
    g = torch.Generator().manual_seed(7)
    upper, lower = torch.randn(3, 4, 40, generator=g) * 4, torch.randn(3, 4, 40, generator=g) * 2
    offset = torch.randn(3, 4, 1, generator=g) * 50
    asked = []

    def lower_at(ids):
        asked.append(ids)
        return lower + offset if ids is None else (lower + offset).gather(-1, ids)

    got = auto_contrastive_log_probs_at_head(upper, lower_at, alpha, mc)
    p_up = upper.softmax(-1)
    threshold = torch.minimum(alpha * p_up.amax(-1, keepdim=True), p_up.topk(mc, -1).values[..., -1:])
    width = int((p_up >= threshold).sum(-1).max())
    assert len(asked) == 1 and (width * 4 <= 40) == narrow
    assert asked[0] is None if not narrow else asked[0].shape == (3, 4, width)
    for row_up, row_low, row_got in zip(upper.reshape(-1, 40), lower.reshape(-1, 40), got.reshape(-1, 40)):
        want = torch.tensor(literal_acd(row_up, row_low, alpha, mc), dtype=torch.float64)
        torch.testing.assert_close(row_got.double(), want, atol=1e-5, rtol=1e-5)
