"""Exit-head training on a frozen base (ModuleFormer, GPT-2, GPT-Neo, Llama or T5) with per-exit held-out perplexity
before and after.

The base is loaded through ``AutoMultiExitModel`` with ``MultiExitConfiguration(lm_head_layer_indices=...,
freeze_parameters=True)``: only ``name_to_lm_exit_head.lm_head_<k>`` train (loss: the sum of the exits' shifted CEs).
New heads start as a copy of the model's ``lm_head`` (``init="lm_head"``, so "before" is the logit-lens perplexity)
or randomly (``init="random"``). The result saves with ``save_pretrained`` + tokenizer and reloads with
``AutoMultiExitModel.from_pretrained(out_dir)``. T5 trains on the same text blocks as a prefix LM (:class:`PrefixLM`).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from moduleformer_exit.perplexity import heldout_perplexities

from .data import BlockOrder, build_lm_data


class PrefixLM(torch.nn.Module):
    """An encoder-decoder model seen as an LM of text blocks ``[B, T]``: the first ``T // 2`` tokens are the encoder
    input, the rest the decoder target (T5's prefix-LM objective), so exit training and held-out perplexity run on
    the causal-LM blocks unchanged. ``forward(input_ids, labels, attention_mask=None)`` returns the model's output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        if input_ids.shape[1] < 2:
            raise ValueError(f"PrefixLM needs blocks of >= 2 tokens, got {tuple(input_ids.shape)}.")
        cut = input_ids.shape[1] // 2
        mask = None if attention_mask is None else attention_mask[:, :cut]
        return self.model(input_ids=input_ids[:, :cut], attention_mask=mask, labels=labels[:, cut:])


def load_exit_model(base: str, layers: Sequence[int], init: str = "lm_head", freeze_existing: bool = False):
    """The base with frozen backbone and exit heads at ``layers`` plus the exits it already has (never dropped).

    New heads start as a copy of ``lm_head`` (``init="lm_head"``) or random; existing heads keep their trained
    weights and train further, or stay fixed with ``freeze_existing``."""
    import moduleformer_exit  # noqa: F401  (registers ModuleFormer)
    from transformers import AutoConfig

    from moduleformer_exit import AutoMultiExitModel, MultiExitConfiguration

    if init not in ("lm_head", "random"):
        raise ValueError(f"init must be 'lm_head' or 'random', got {init!r}.")
    existing = set(getattr(AutoConfig.from_pretrained(base), "lm_head_layer_indices", None) or [])
    all_layers = sorted(existing | set(layers))
    cfg = MultiExitConfiguration(lm_head_layer_indices=tuple(all_layers), freeze_parameters=True)
    model = AutoMultiExitModel.from_pretrained(base, multi_exit_config=cfg)
    new = [k for k in all_layers if k not in existing]
    if init == "lm_head":
        with torch.no_grad():
            for k in new:
                model.name_to_lm_exit_head[f"lm_head_{k}"].weight.copy_(model.lm_head.weight)
    model.apply_freeze()
    if freeze_existing:
        for k in existing:
            model.name_to_lm_exit_head[f"lm_head_{k}"].weight.requires_grad_(False)
    return model


def train_exits(base: str, layers: Sequence[int], data_files: Sequence[str] | str, output_dir: Optional[str] = None,
                *, steps: int = 200, lr: float = 1e-3, batch_size: int = 8, block_size: int = 128,
                heldout_fraction: float = 0.05, max_heldout_blocks: int = 64, seed: int = 0,
                init: str = "lm_head", data_format: str = "text", sample_by: str = "paragraph",
                log_every: int = 0, freeze_existing: bool = False) -> dict:
    """Train exit heads on a frozen base (the base's own exits are kept: trained further, or fixed with
    ``freeze_existing``); returns ``{"before": {...}, "after": {...}, "seconds": s}``."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    torch.set_flush_denormal(True)  # CPU: denormals slow fresh heads down by orders of magnitude
    torch.manual_seed(seed)
    model = load_exit_model(base, layers, init, freeze_existing)
    data = build_lm_data(data_files, block_size, tokenizer=base, data_format=data_format, sample_by=sample_by,
                         heldout_fraction=heldout_fraction, seed=seed, max_heldout_blocks=max_heldout_blocks)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lm = PrefixLM(model) if getattr(model.config, "is_encoder_decoder", False) else model
    before = heldout_perplexities(lm, data.heldout)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("No trainable exit heads: check lm_head_layer_indices.")
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    order = BlockOrder(data.train.shape[0], seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        x = data.train[order.indices(step * batch_size, batch_size)]
        loss = lm(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: exit loss {loss.item():.3f}")
    seconds = time.time() - t0
    after = heldout_perplexities(lm, data.heldout)
    for n, p in model.named_parameters():  # the base really stayed frozen
        if n in frozen_before and not torch.equal(frozen_before[n], p):
            raise RuntimeError(f"Frozen parameter {n} changed during exit training.")
    if output_dir:
        model.save_pretrained(output_dir)
        data.tokenizer.save_pretrained(output_dir)
    return {"before": before, "after": after, "seconds": seconds, "output_dir": output_dir}


def format_report(result: dict) -> str:
    lines = [f"{'head':>8} {'ppl before':>12} {'ppl after':>12}"]
    for k in result["before"]:
        lines.append(f"{k:>8} {result['before'][k]:12.2f} {result['after'][k]:12.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json

    from .distributed import offline_by_default

    offline_by_default()

    p = argparse.ArgumentParser(prog="moduleformer-exit train-exits", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="base checkpoint directory (ModuleFormer, GPT-2, GPT-Neo, Llama "
                                                  "or T5) with its tokenizer")
    p.add_argument("--layers", required=True, help="comma-separated exit layers to add or train, e.g. 2,4 (the "
                                                   "model's existing exits are always kept)")
    p.add_argument("--freeze-existing", action="store_true",
                   help="keep the model's existing exit heads fixed (default: train them further)")
    p.add_argument("--data", nargs="+", default=["bundled:austen"], help="text/json/parquet files or bundled:austen")
    p.add_argument("--format", default="text", choices=("text", "json", "parquet"), help="data file format")
    p.add_argument("--output-dir", required=True, help="where the model with its exits and tokenizer is saved")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per step")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block")
    p.add_argument("--init", default="lm_head", choices=("lm_head", "random"),
                   help="new heads start as a copy of lm_head (logit lens) or random")
    p.add_argument("--seed", type=int, default=0, help="torch seed and data split seed")
    args = p.parse_args(argv)
    layers = [int(k) for k in args.layers.split(",") if k.strip()]
    result = train_exits(args.model, layers, args.data, args.output_dir, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, block_size=args.block_size, init=args.init, seed=args.seed,
                         data_format=args.format, log_every=max(1, args.steps // 10),
                         freeze_existing=args.freeze_existing)
    print(format_report(result))
    print(json.dumps({k: result[k] for k in ("before", "after", "output_dir")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
