"""Shared test set-up: offline Hugging Face, fixed threads and seeds, tiny ModuleFormer configs."""
import os
import tempfile

# Never touch the hub; keep caches out of $HOME. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "moduleformer-exit-test-hf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run on CPU through the Triton interpreter; the variable must be set before any @triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: tiny tensors gain nothing from more, and idle OpenMP workers spinning on a shared 2-core
# machine slow every small op down by an order of magnitude.
torch.set_num_threads(1)


def tiny_config_kwargs(**overrides):
    """Keyword arguments of a tiny ModuleFormer (fast on CPU, every code path exercised)."""
    kwargs = dict(
        vocab_size=97, n_embd=32, n_layer=2, n_head=2, att_hidden=16, ffd_hidden=24,
        n_att_experts=4, k_att=2, n_mlp_experts=6, k_mlp=2, gating_size=8,
        history_length=8, block_size=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config(**overrides)`` -> ModuleFormerConfig."""
    from moduleformer_exit import ModuleFormerConfig

    return lambda **overrides: ModuleFormerConfig(**tiny_config_kwargs(**overrides))


@pytest.fixture
def tiny_model(tiny_config):
    """Factory: ``tiny_model(seed=0, **overrides)`` -> ModuleFormerForCausalLM in eval mode, fp32."""
    from moduleformer_exit import ModuleFormerForCausalLM

    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return ModuleFormerForCausalLM(tiny_config(**overrides)).eval()

    return make


def child_process_env(tmp) -> dict:
    """Environment for a training child process (torchrun / deepspeed launcher): one thread, CPU DeepSpeed, offline,
    unbuffered, extensions under ``tmp``, and no inherited rendezvous variables (the launcher sets its own)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.path.join(str(tmp), "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env
