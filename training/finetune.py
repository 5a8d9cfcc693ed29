"""Fine-tuning through the HF Trainer on a local dataset: causal LM (packed blocks) or sequence classification;
DeepSpeed (config file or dict) and LoRA (PEFT) optional.

On CPU the Trainer needs ``use_cpu=True`` for DeepSpeed to see the real world size; DeepSpeed's shm comm op is
skipped (no JIT compile). Launch multi-process with ``torchrun --nproc_per_node N -m
moduleformer_exit.training.finetune ...``; a single process without a launcher gets RANK/WORLD_SIZE defaults.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import torch

TASKS = ("causal-lm", "sequence-classification")


def _deepspeed_setup(ds_config) -> Optional[dict | str]:
    if ds_config is None:
        return None
    from .distributed import ensure_dist_env

    ensure_dist_env()
    import deepspeed

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if isinstance(ds_config, str):
        with open(ds_config) as f:
            ds_config = json.load(f)
    return ds_config


def _apply_lora(model, lora: dict, task: str):
    from peft import LoraConfig, get_peft_model

    lora = dict(lora)
    lora.setdefault("r", 8)
    lora.setdefault("lora_alpha", 2 * lora["r"])
    lora.setdefault("lora_dropout", 0.0)
    if not lora.get("target_modules") and not lora.get("target_parameters"):
        lora["target_modules"] = ["k_proj", "v_proj"]  # ModuleFormer's dense attention projections
    cfg = LoraConfig(task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS", **lora)
    return get_peft_model(model, cfg)


def _load_causal_lm(model_dir: str, exit_heads: str):
    """The checkpoint as a causal LM; a multi-exit checkpoint keeps its exit heads (``exit_heads="train"``: the
    loss is the original head's CE plus the exits', ``"freeze"``: the heads stay fixed, the loss is the original
    head's CE), so the saved model still has every head its config names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moduleformer_exit import AutoMultiExitModel

    if exit_heads not in ("train", "freeze"):
        raise ValueError(f"exit_heads must be 'train' or 'freeze', got {exit_heads!r}.")
    if not getattr(AutoConfig.from_pretrained(model_dir), "lm_head_layer_indices", None):
        return AutoModelForCausalLM.from_pretrained(model_dir)
    model = AutoMultiExitModel.from_pretrained(model_dir)
    model.config.lm_loss_weight = 1.0
    if exit_heads == "freeze":
        model.config.exit_loss_weight = 0.0
        for name, p in model.named_parameters():
            if name.startswith("name_to_lm_exit_head."):
                p.requires_grad_(False)
    elif not model.config.exit_loss_weight:
        model.config.exit_loss_weight = 1.0
    return model


def finetune(model_dir: str, data_files: Sequence[str] | str, output_dir: str, *, task: str = "causal-lm",
             data_format: str = "text", sample_by: str = "paragraph", text_field: str = "text",
             label_field: str = "label", num_labels: Optional[int] = None, block_size: int = 128,
             max_steps: int = 100, lr: float = 1e-4, batch_size: int = 8, gradient_accumulation_steps: int = 1,
             eval_fraction: float = 0.05, seed: int = 0, deepspeed=None, lora: Optional[dict] = None,
             merge_lora: bool = True, logging_steps: int = 10, exit_heads: str = "train") -> dict:
    """Fine-tune ``model_dir`` (with its tokenizer) and save the result (merged LoRA by default) with the tokenizer
    in ``output_dir``; returns the Trainer's eval metrics (+ ``perplexity`` for causal LM, and ``perplexity_exit<k>``
    for a multi-exit checkpoint, whose exit heads are kept: ``exit_heads`` "train" or "freeze")."""
    import moduleformer_exit  # noqa: F401
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator)

    from .data import build_lm_data

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    disable_progress_bar()
    ds_config = _deepspeed_setup(deepspeed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if task == "causal-lm":
        data = build_lm_data(data_files, block_size, tokenizer=tokenizer, data_format=data_format,
                             sample_by=sample_by, text_field=text_field, heldout_fraction=eval_fraction, seed=seed)
        train_ds = Dataset.from_dict({"input_ids": data.train.tolist(), "labels": data.train.tolist()})
        eval_ds = Dataset.from_dict({"input_ids": data.heldout.tolist(), "labels": data.heldout.tolist()})
        model = _load_causal_lm(model_dir, exit_heads)
        collator = default_data_collator
    else:
        from datasets import load_dataset

        from .data import resolve_data_files

        raw = load_dataset(data_format, data_files={"train": resolve_data_files(data_files)}, split="train")
        if text_field not in raw.column_names or label_field not in raw.column_names:
            raise ValueError(f"sequence classification needs columns {text_field!r} and {label_field!r}; the data "
                             f"has {raw.column_names}.")
        labels = sorted(set(raw[label_field]))
        if num_labels is None:
            num_labels = len(labels)
        to_id = {v: i for i, v in enumerate(labels)} if not all(isinstance(v, int) for v in labels) else None

        def encode(batch):
            enc = tokenizer(batch[text_field], truncation=True, max_length=block_size)
            enc["labels"] = [to_id[v] if to_id else v for v in batch[label_field]]
            return enc

        enc = raw.map(encode, batched=True, remove_columns=raw.column_names)
        split = enc.train_test_split(test_size=eval_fraction, seed=seed)
        train_ds, eval_ds = split["train"], split["test"]
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.lm_head_layer_indices = []  # a classifier has no exit heads: its config must not name any
        collator = DataCollatorWithPadding(tokenizer)
    if lora:
        model = _apply_lora(model, lora, task)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        logging_steps=logging_steps, save_strategy="no", eval_strategy="no", report_to="none", seed=seed,
        use_cpu=not torch.cuda.is_available(), deepspeed=ds_config, lr_scheduler_type="cosine",
        warmup_steps=max(0, max_steps // 10), disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator)
    # Evaluating before training would make the Trainer build a ZeRO *inference* engine (stage 3 only): skip it
    # under DeepSpeed.
    before = None if ds_config is not None else trainer.evaluate()
    multi_exit = task == "causal-lm" and bool(getattr(model.config, "lm_head_layer_indices", None))
    if multi_exit:  # eval_loss sums several heads' CEs: perplexities per head from the model's loss parts
        from moduleformer_exit.perplexity import heldout_perplexities

        ppl_before = heldout_perplexities(trainer.model, data.heldout, batch_size) if before is not None else None
    trainer.train()
    metrics = trainer.evaluate()
    if before is not None:
        metrics["eval_loss_before"] = before["eval_loss"]
    if task == "causal-lm":
        if multi_exit:
            for suffix, ppl in (("_before", ppl_before), ("", heldout_perplexities(trainer.model, data.heldout,
                                                                                   batch_size))):
                for head, value in (ppl or {}).items():
                    metrics[f"perplexity{'' if head == 'final' else '_' + head}{suffix}"] = value
        else:
            if before is not None:
                metrics["perplexity_before"] = math.exp(before["eval_loss"])
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
    if not lora:
        trainer.save_model(output_dir)  # every rank: gathers ZeRO-3 partitions (stage3_gather_16bit_weights_...)
    elif trainer.is_world_process_zero():  # LoRA: merged weights (default) or the adapter alone
        if merge_lora:
            trainer.model.merge_and_unload().save_pretrained(output_dir)
        else:
            trainer.model.save_pretrained(os.path.join(output_dir, "adapter"))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "finetune_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="moduleformer-exit finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory with its tokenizer")
    p.add_argument("--data", nargs="+", required=True, help="local text/json/parquet files (or bundled:austen)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--task", default="causal-lm", choices=TASKS)
    p.add_argument("--format", default="text", choices=("text", "json", "parquet"))
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--num-labels", type=int, default=None)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (\"auto\" values allowed)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default k_proj,v_proj)")
    p.add_argument("--no-merge-lora", action="store_true", help="save the adapter instead of merged weights")
    p.add_argument("--exit-heads", default="train", choices=("train", "freeze"),
                   help="a multi-exit checkpoint's exit heads: fine-tune them with the model or keep them fixed "
                        "(they are always kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    from .distributed import offline_by_default, shutdown_distributed

    offline_by_default()

    args = build_parser().parse_args(argv)
    lora = None
    if args.lora_r:
        lora = {"r": args.lora_r}
        if args.lora_alpha is not None:
            lora["lora_alpha"] = args.lora_alpha
        if args.lora_targets:
            lora["target_modules"] = args.lora_targets.split(",")
    metrics = finetune(args.model, args.data, args.output_dir, task=args.task, data_format=args.format,
                       text_field=args.text_field, label_field=args.label_field, num_labels=args.num_labels,
                       block_size=args.block_size, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                       gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed,
                       deepspeed=args.deepspeed, lora=lora, merge_lora=not args.no_merge_lora,
                       exit_heads=args.exit_heads)
    shutdown_distributed()
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
