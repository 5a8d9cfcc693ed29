"""Grouped GEMMs split across threads by expert (kernels.expert_threads), through the torch expert linear: outputs
and gradients against an independent float64 per-(token, slot) loop, on routings with empty and overloaded experts.
The path is enabled and ``MIN_FLOPS`` lowered so that these small shapes take it (a spy checks it ran)."""
import pytest
import torch

from moduleformer_exit.kernels import expert_threads
from moduleformer_exit.kernels.expert_linear import expert_linear
from moduleformer_exit.kernels.routing import plan_routing
from test_expert_linear import leaf, ref_map, ref_reduce, routing


@pytest.fixture
def threaded(monkeypatch):
    """Two intra-op threads, MIN_FLOPS 0, and a count of the threaded calls; restores the thread count."""
    calls = []
    for name in ("threaded_grouped_mm", "threaded_grouped_mm_wgrad"):
        real = getattr(expert_threads, name)

        def spy(*args, _real=real, _name=name):
            out = _real(*args)
            calls.append((_name, out is not None))
            return out
        monkeypatch.setattr(f"moduleformer_exit.kernels.torch_expert_linear.{name}", spy)
    monkeypatch.setattr(expert_threads, "MIN_FLOPS", 0)
    monkeypatch.setattr(expert_threads, "ENABLED", True)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield calls
    torch.set_num_threads(previous)


@pytest.mark.parametrize("kind, n, k, e", [("uniform", 40, 2, 6), ("skewed", 50, 2, 8), ("one", 9, 1, 4)])
def test_threaded_map_and_reduce_match_float64_loop(threaded, kind, n, k, e):
    idx = routing(n, k, e, kind, seed=n)
    plan = plan_routing(idx, e)
    x, w = leaf(n, 16, seed=1), leaf(e, 16, 24, scale=0.3, seed=2)
    xp, w2 = leaf(n * k, 24, seed=3), leaf(e, 24, 8, scale=0.3, seed=4)
    gates = leaf(n, k, seed=5)
    y = expert_linear(x, w, plan, fan_out=k, backend="torch")
    z = expert_linear(xp, w2, plan, fan_out=1, gates=gates, backend="torch")
    cot_y, cot_z = torch.randn(y.shape, dtype=torch.float64), torch.randn(z.shape, dtype=torch.float64)
    ((y.double() * cot_y).sum() + (z.double() * cot_z).sum()).backward()
    assert torch.get_num_threads() == 2  # restored after every threaded call
    assert ("threaded_grouped_mm", True) in threaded and ("threaded_grouped_mm_wgrad", True) in threaded

    leaves = [t.detach().double().requires_grad_() for t in (x, w, xp, w2, gates)]
    x64, w64, xp64, w264, g64 = leaves
    y64, z64 = ref_map(x64, w64, idx), ref_reduce(xp64, w264, idx, g64)
    ((y64 * cot_y).sum() + (z64 * cot_z).sum()).backward()
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.double(), z64, atol=1e-5, rtol=1e-5)
    for got, ref in zip((x, w, xp, w2, gates), leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


def test_blocks_cover_every_expert_once_with_balanced_rows():
    offsets = [3, 3, 10, 10, 10, 14, 20, 21]  # inclusive ends; experts 1, 3, 4 empty
    for blocks in (1, 2, 3):
        ranges = expert_threads._expert_blocks(offsets, blocks)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(offsets)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        rows = [offsets[hi - 1] - (offsets[lo - 1] if lo else 0) for lo, hi in ranges]
        assert sum(rows) == offsets[-1] and max(rows) <= offsets[-1] // blocks + 7  # within one expert's rows


def test_serial_when_disabled_below_min_flops_and_on_one_thread(monkeypatch):
    a, b = torch.randn(8, 16), torch.randn(2, 16, 8)
    offs = torch.tensor([3, 8], dtype=torch.int32)
    assert expert_threads.threaded_grouped_mm(torch.nn.functional.grouped_mm, a, b, offs) is None  # tiny
    monkeypatch.setattr(expert_threads, "MIN_FLOPS", 0)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(expert_threads, "ENABLED", False)  # the default: opt-in only
        assert expert_threads.threaded_grouped_mm(torch.nn.functional.grouped_mm, a, b, offs) is None
        monkeypatch.setattr(expert_threads, "ENABLED", True)
        assert expert_threads.threaded_grouped_mm(torch.nn.functional.grouped_mm, a, b, offs) is not None
        torch.set_num_threads(1)
        assert expert_threads.threaded_grouped_mm(torch.nn.functional.grouped_mm, a, b, offs) is None
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_moe_layer_threaded_under_every_grad_mode(threaded, mode):
    """Grad and inference mode are thread-local: the helper threads must run as the caller's thread (an inference
    tensor written outside inference mode, or a Parameter recorded by autograd there, raises)."""
    from moduleformer_exit.moe import MoE

    torch.manual_seed(0)
    moe = MoE(16, 24, num_experts=6, top_k=2, activation=torch.nn.functional.gelu, gating_size=8)
    x = torch.randn(2, 20, 16)
    context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}.get(mode)
    with (context() if context else torch.enable_grad()):
        y, _ = moe(x, compute_aux=False)
    assert ("threaded_grouped_mm", True) in threaded
    expert_threads.MIN_FLOPS = 1 << 62  # (monkeypatched: restored after the test) the serial path
    with torch.no_grad():
        y_serial, _ = moe(x, compute_aux=False)
    torch.testing.assert_close(y.detach(), y_serial, atol=1e-6, rtol=1e-6)
