"""Triton expert-linear kernels (run on CPU through the Triton interpreter) against float64 per-pair loops.

Tiles are kept small relative to the problem (BLOCK_M=16/32 over 30-80 pair rows) so that tiles straddle experts and
several programs run, while each launch stays at a handful of programs (the interpreter costs ~1 ms per program).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moduleformer_exit.kernels import backend as backend_mod
from moduleformer_exit.kernels.backend import BACKENDS, resolve_backend
from moduleformer_exit.kernels.expert_linear import expert_linear
from moduleformer_exit.kernels.routing import plan_routing
from moduleformer_exit.kernels.triton_expert_linear import ExpertBlocks, expert_blocks, triton_expert_linear

pytest.importorskip("triton")

SMALL = ExpertBlocks(m=16, n=16, k=16, w_m=16, w_k=16, w_n=16)  # dims below are not multiples of 16
MEDIUM = ExpertBlocks(m=32, n=32, k=16, w_m=32, w_k=32, w_n=32)


# ------------------------------------------------------------------ float64 references (per pair, no sorting)


def ref_pairs(rows, w, idx, fan_out):
    """Token-major pair outputs [N*k, out]: pair p = t*k + j reads rows[p // fan_out] and uses expert idx[t, j]."""
    flat = idx.reshape(-1)
    return torch.stack([rows[p // fan_out] @ w[flat[p]] for p in range(flat.numel())])


def ref_gated(rows, w, idx, g, fan_out):
    """[N, out]: y[t] = sum_j g[t, j] * rows[(t*k + j) // fan_out] @ w[idx[t, j]]."""
    n, k = idx.shape
    y = ref_pairs(rows, w, idx, fan_out).view(n, k, -1)
    return (g.unsqueeze(-1) * y).sum(1)


def to_grouped(pairs, idx):
    """Token-major pair rows -> expert-sorted (stable) order, independently of the plan."""
    order = sorted(range(idx.numel()), key=lambda p: (idx.reshape(-1)[p].item(), p))
    return pairs[torch.tensor(order, dtype=torch.long)]


def make_routing(n, k, e, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    if kind == "skewed":  # uneven loads, odd experts empty
        probs = torch.zeros(e, dtype=torch.float64)
        probs[::2] = 0.5 ** torch.arange(len(probs[::2]), dtype=torch.float64)
        return torch.stack([torch.multinomial(probs, k, generator=gen) for _ in range(n)])
    if kind == "one":  # every pair on the last expert (k = 1)
        return torch.full((n, k), e - 1, dtype=torch.long)
    raise ValueError(kind)


def leaf(*shape, seed=0, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def as64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


def check(got, want, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


def check_grads(out, inputs, out64, inputs64, seed=1, **tol):
    gen = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, cot.to(out.dtype))
    want = torch.autograd.grad(out64, inputs64, cot)
    for a, b in zip(got, want):
        check(a, b, **tol)


CASES = [  # n, k, e, d, h, routing kind
    (20, 2, 6, 20, 24, "uniform"),
    (24, 2, 8, 20, 24, "skewed"),
    (30, 1, 4, 24, 20, "one"),
    (13, 3, 5, 17, 33, "uniform"),
]


# ------------------------------------------------------------------ every expert_linear path


@pytest.mark.parametrize("n, k, e, d, h, kind", CASES)
def test_map_scattered_and_grouped(n, k, e, d, h, kind):
    idx = make_routing(n, k, e, kind)
    plan = plan_routing(idx, e)
    x, w = leaf(n, d, seed=1), leaf(e, d, h, seed=2, scale=0.3)
    x64, w64 = as64(x, w)
    ref = ref_pairs(x64, w64, idx, k)
    y = triton_expert_linear(x, w, plan, fan_out=k, blocks=SMALL)
    check(y, ref)
    check_grads(y, [x, w], ref, [x64, w64])
    y = triton_expert_linear(x, w, plan, fan_out=k, grouped_out=True, blocks=SMALL)
    ref = to_grouped(ref_pairs(x64, w64, idx, k), idx)
    check(y, ref)
    check_grads(y, [x, w], ref, [x64, w64])


@pytest.mark.parametrize("n, k, e, d, h, kind", CASES)
@pytest.mark.parametrize("gated", [True, False])
def test_reduce(n, k, e, d, h, kind, gated):
    idx = make_routing(n, k, e, kind)
    plan = plan_routing(idx, e)
    xp, w, g = leaf(n * k, d, seed=1), leaf(e, d, h, seed=2, scale=0.3), leaf(n, k, seed=3)
    xp64, w64, g64 = as64(xp, w, g)
    if gated:
        y = triton_expert_linear(xp, w, plan, fan_out=1, gates=g, blocks=SMALL)
        ref = ref_gated(xp64, w64, idx, g64, 1)
        check(y, ref)
        check_grads(y, [xp, w, g], ref, [xp64, w64, g64])
    else:
        y = triton_expert_linear(xp, w, plan, fan_out=1, blocks=SMALL)
        ref = ref_pairs(xp64, w64, idx, 1)
        check(y, ref)
        check_grads(y, [xp, w], ref, [xp64, w64])


@pytest.mark.parametrize("n, k, e, d, h, kind", CASES)
def test_mlp_path_grouped_out_then_grouped_in_with_gates(n, k, e, d, h, kind):
    idx = make_routing(n, k, e, kind)
    plan = plan_routing(idx, e)
    x, g = leaf(n, d, seed=1), leaf(n, k, seed=4)
    w1, w2 = leaf(e, d, h, seed=2, scale=0.3), leaf(e, h, d, seed=3, scale=0.3)
    hid = triton_expert_linear(x, w1, plan, fan_out=k, grouped_out=True, blocks=MEDIUM)
    y = triton_expert_linear(F.gelu(hid), w2, plan, fan_out=1, grouped_in=True, gates=g, blocks=MEDIUM)
    x64, w164, w264, g64 = as64(x, w1, w2, g)
    ref = ref_gated(F.gelu(ref_pairs(x64, w164, idx, k)), w264, idx, g64, 1)
    check(y, ref)
    check_grads(y, [x, w1, w2, g], ref, [x64, w164, w264, g64])


def test_gates_with_fan_out_k_and_partial_grads():
    # gates on a map (fan_out = k, x = tokens) and only some inputs requiring grad.
    n, k, e, d, h = 16, 2, 5, 12, 20
    idx = make_routing(n, k, e, "uniform", seed=5)
    plan = plan_routing(idx, e)
    x, w, g = leaf(n, d, seed=1), leaf(e, d, h, seed=2), leaf(n, k, seed=3)
    x64, w64, g64 = as64(x, w, g)
    y = triton_expert_linear(x, w, plan, fan_out=k, gates=g, blocks=SMALL)
    ref = ref_gated(x64, w64, idx, g64, k)
    check(y, ref)
    check_grads(y, [x, w, g], ref, [x64, w64, g64])
    w.requires_grad_(False)
    g2 = g.detach()
    y = triton_expert_linear(x, w, plan, fan_out=k, gates=g2, blocks=SMALL)
    check_grads(y, [x], ref_gated(x64, w64, idx, g64.detach(), k), [x64])


def test_float64():
    n, k, e, d, h = 18, 2, 6, 20, 12
    idx = make_routing(n, k, e, "skewed", seed=2)
    plan = plan_routing(idx, e)
    xp, w, g = (leaf(n * k, d, seed=1, dtype=torch.float64), leaf(e, d, h, seed=2, dtype=torch.float64),
                leaf(n, k, seed=3, dtype=torch.float64))
    y = triton_expert_linear(xp, w, plan, fan_out=1, gates=g, blocks=SMALL)
    assert y.dtype == torch.float64
    xp64, w64, g64 = as64(xp, w, g)
    ref = ref_gated(xp64, w64, idx, g64, 1)
    check(y, ref, atol=1e-12, rtol=1e-12)
    check_grads(y, [xp, w, g], ref, [xp64, w64, g64], atol=1e-12, rtol=1e-12)


def test_bfloat16_interpreter_upcast():
    n, k, e, d, h = 16, 2, 4, 16, 24
    idx = make_routing(n, k, e, "uniform", seed=3)
    plan = plan_routing(idx, e)
    xp = leaf(n * k, d, seed=1, dtype=torch.bfloat16)
    w = leaf(e, d, h, seed=2, dtype=torch.bfloat16, scale=0.3)
    g = leaf(n, k, seed=3, dtype=torch.bfloat16)
    y = triton_expert_linear(xp, w, plan, fan_out=1, gates=g, blocks=SMALL)
    assert y.dtype == torch.bfloat16
    xp64, w64, g64 = as64(xp, w, g)
    ref = ref_gated(xp64, w64, idx, g64, 1)
    check(y, ref, atol=3e-2, rtol=3e-2)
    check_grads(y, [xp, w, g], ref, [xp64, w64, g64], atol=5e-2, rtol=3e-2)


def test_expanded_grad_noncontiguous_inputs_and_deterministic_wgrad():
    n, k, e, d, h = 20, 2, 6, 20, 24
    idx = make_routing(n, k, e, "uniform", seed=4)
    plan = plan_routing(idx, e)
    base_x, base_w = leaf(d, n, seed=1), leaf(e, h, d, seed=2)
    x, w = base_x.t(), base_w.transpose(1, 2)  # non-contiguous views
    y = triton_expert_linear(x, w, plan, fan_out=k, blocks=SMALL)
    y.sum().backward()  # grad_out is a zero-stride expanded tensor
    x64, w64 = as64(x, w)
    ref_pairs(x64, w64, idx, k).sum().backward()
    check(base_x.grad.t(), x64.grad)
    check(base_w.grad.transpose(1, 2), w64.grad)
    # dW: one owner per element, fixed summation order -> bitwise reproducible
    first = base_w.grad.clone()
    base_w.grad = None
    triton_expert_linear(x, w, plan, fan_out=k, blocks=SMALL).sum().backward()
    assert torch.equal(first, base_w.grad)


def test_expert_linear_dispatch_matches_torch_backend():
    n, k, e, d, h = 12, 2, 4, 16, 16
    idx = make_routing(n, k, e, "uniform", seed=6)
    plan = plan_routing(idx, e)
    x, w, g = leaf(n * k, d, seed=1), leaf(e, d, h, seed=2), leaf(n, k, seed=3)
    with expert_blocks(m=16, n=16, k=16, w_m=16, w_k=16, w_n=16):
        outs = {b: expert_linear(x, w, plan, fan_out=1, gates=g, backend=b) for b in ("torch", "triton")}
    check(outs["triton"], outs["torch"].detach(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ MoE layer: torch vs triton backends


@pytest.mark.parametrize("num_experts, k", [(6, 2), (4, 1)])
def test_moe_layer_torch_vs_triton(num_experts, k):
    from moduleformer_exit.moe import MoE

    torch.manual_seed(0)
    results = {}
    for name in ("torch", "triton"):
        torch.manual_seed(0)
        moe = MoE(12, 20, num_experts, k, activation=F.gelu, gating_size=6, kernel_backend=name)
        x = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with expert_blocks(m=16, n=32, k=16, w_m=16, w_k=32, w_n=32):
            y, _ = moe(x, compute_aux=False)
            q, _, routing, plan = moe.map(x, compute_aux=False)
            z = moe.reduce(torch.tanh(q), routing, plan)
            (y.square().sum() + z.square().sum()).backward()
        results[name] = [y, q, z, x.grad] + [p.grad for p in moe.parameters() if p.grad is not None]
    assert len(results["torch"]) == len(results["triton"])
    for a, b in zip(results["triton"], results["torch"]):
        check(a.detach(), b.detach(), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ backend resolution


def test_resolve_backend(monkeypatch):
    cpu = torch.zeros(1)
    assert BACKENDS == ("auto", "torch", "triton", "megablocks")
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", cpu) == "torch"  # CPU tensors never auto-pick the interpreter
    assert resolve_backend("triton", cpu) == "triton"  # TRITON_INTERPRET=1 in the tests
    with pytest.raises(ValueError, match="valid choices: auto, torch, triton, megablocks"):
        resolve_backend("cuda-magic", cpu)
    if not backend_mod.megablocks_available():
        with pytest.raises(RuntimeError, match="pip install megablocks"):
            resolve_backend("megablocks", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
    monkeypatch.setattr(backend_mod, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not importable"):
        resolve_backend("triton", cpu)
    assert resolve_backend("auto", cpu) == "torch"


def test_config_accepts_new_backends():
    from moduleformer_exit.configuration import KERNEL_BACKENDS, ModuleFormerConfig

    assert KERNEL_BACKENDS == BACKENDS
    assert ModuleFormerConfig(kernel_backend="triton").kernel_backend == "triton"
    with pytest.raises(ValueError, match="kernel_backend"):
        ModuleFormerConfig(kernel_backend="cuda-magic")


def test_import_without_triton():
    # A meta-path None entry makes `import triton` raise ImportError; the package and the torch path must still work.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, moduleformer_exit\n"
        "from moduleformer_exit.kernels import expert_linear, plan_routing\n"
        "from moduleformer_exit.kernels.backend import resolve_backend\n"
        "import moduleformer_exit.kernels.triton_expert_linear\n"
        "plan = plan_routing(torch.tensor([[0, 1], [1, 0]]), 2)\n"
        "assert expert_linear(torch.randn(2, 4), torch.randn(2, 4, 3), plan, fan_out=2).shape == (4, 3)\n"
        "assert resolve_backend('auto', torch.zeros(1)) == 'torch'\n"
        "try:\n    resolve_backend('triton', torch.zeros(1))\n"
        "except RuntimeError as e:\n    assert 'not importable' in str(e)\n"
        "else:\n    raise AssertionError\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_cuda_bench_module_imports_without_gpu():
    from moduleformer_exit.benchmarks import kernels_cuda

    assert callable(kernels_cuda.bench_expert_kernels_cuda)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            kernels_cuda.bench_expert_kernels_cuda()


_AOT_SCRIPT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "0"  # real @triton.jit functions, compiled for a GPU target without a GPU
sys.path.insert(0, sys.argv[1])  # the repo root: import `kernels` directly (no transformers in this process)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.triton_expert_linear import _kernels

_, _, s2s, wgrad = _kernels()

def build(fn, types, consts):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    cx = {(fn.arg_names.index(n),): v for n, v in consts.items()}
    k = triton.compile(ASTSource(fn, sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, num_stages=3))
    assert k.asm["cubin"]

common = dict(ACC_DTYPE=tl.float32, UPCAST=False, PRECISION="ieee")
build(s2s, dict(X="*bf16", W="*bf16", Y="*bf16", SORTED_E="*i64", SORTED_P="*i64"),
      dict(X_GROUPED=False, X_DIV=2, Y_GROUPED=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, **common))
build(wgrad, dict(X="*bf16", DY="*bf16", DW="*bf16", OFFSETS="*i64", SORTED_P="*i64", G="*fp32"),
      dict(X_GROUPED=False, X_DIV=2, DY_GROUPED=False, DY_DIV=1, HAS_G=True, BLOCK_M=32, BLOCK_K=128, BLOCK_N=128,
           **common))
print("compiled")
"""


def test_kernels_compile_for_sm90_without_gpu(tmp_path):
    # Interpreter runs skip the GPU compiler; this compiles the bf16 kernels to an sm_90 cubin (Triton's bundled
    # ptxas) so type/lowering errors surface on a CPU-only machine too.
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    assert os.path.exists(ptxas), f"triton {triton.__version__} ships no ptxas at {ptxas}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))  # fresh cache: really compile, leave ~/.triton alone
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, root], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
