"""Pretraining recipes: JSON files (``configs/recipes/*.json``), validated completely before any work starts.

A recipe has five sections; every key is optional except ``model`` (defaults below)::

    {"name": "...",
     "model":     {ModuleFormerConfig fields; "vocab_size": "tokenizer" takes the tokenizer's size},
     "model":     {..., "model_type": "moduleformer" | "gpt2" | "gpt_neo" (then GPT2Config / GPTNeoConfig fields)},
     "exits":     {"layers": [2, 4], "loss_weight": 1.0,               # joint exit loss (empty: none)
                   "loss": "ce" | "shallow_deep" | "layerskip", "weighting": "sum" | "calm",   # ce: the weighting
                   "shallow_exit": null, "kd_alpha": 0.5,              # shallow_deep (FREE): S, KD weight
                   "scale": "sum_l", "e_scale": 1.0,                   # layerskip: exit scale, non-final factor
                   "layer_dropout": 0.0, "layer_dropout_scale": "exp"},  # LayerSkip layer dropout (any loss)
     "data":      {"files": ["bundled:austen"], "format": "text", "sample_by": "paragraph", "text_field": "text",
                   "streaming": false, "block_size": 128, "heldout_fraction": 0.05, "seed": 1234,
                   "tokenizer": null | "path", "vocab_size": 2048, "max_train_blocks": null,
                   "max_heldout_blocks": 64},
     "training":  {"max_steps": 200, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup_steps": 20, "weight_decay": 0.1,
                   "betas": [0.9, 0.95], "eps": 1e-8, "optimizer": "client" | "config", "seed": 0,
                   "log_interval": 10, "eval_interval": 100, "save_interval": 100, "keep_checkpoints": 2,
                   "eval_batch_size": 16, "flush_denormal": true,
                   "init_from": null | "path/to/final"},     # start from a multi-exit checkpoint (model: {})
     "deepspeed": {DeepSpeed config: "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "gradient_clipping", "zero_optimization": {"stage": 0-3}, "bf16": {"enabled": bool}}}
"""
from __future__ import annotations

import copy
import json
import os
import re
from importlib.resources import files as _package_files
from typing import Any, Optional, Sequence

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "model": {},
    "exits": {"layers": [], "loss_weight": 1.0, "loss": "ce", "weighting": "sum", "shallow_exit": None,
              "kd_alpha": 0.5, "scale": "sum_l", "e_scale": 1.0, "layer_dropout": 0.0, "layer_dropout_scale": "exp"},
    "data": {"files": ["bundled:austen"], "format": "text", "sample_by": "paragraph", "text_field": "text",
             "streaming": False, "block_size": 128, "heldout_fraction": 0.05, "seed": 1234, "tokenizer": None,
             "vocab_size": 2048, "max_train_blocks": None, "max_heldout_blocks": 64, "num_proc": None},
    "training": {"max_steps": 200, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup_steps": 20, "weight_decay": 0.1,
                 "betas": [0.9, 0.95], "eps": 1e-8, "optimizer": "client", "seed": 0, "log_interval": 10,
                 "eval_interval": 100, "save_interval": 100, "keep_checkpoints": 2, "eval_batch_size": 16, "flush_denormal": True,
                 "init_from": None},
    "deepspeed": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": 0}, "bf16": {"enabled": False}},
}
DS_KEYS = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "zero_optimization",
           "bf16", "fp16", "steps_per_print", "wall_clock_breakdown", "train_batch_size", "optimizer", "scheduler",
           "activation_checkpointing", "communication_data_type", "prescale_gradients", "zero_allow_untested_optimizer",
           "zero_force_ds_cpu_optimizer", "seed", "data_types", "flops_profiler", "tensorboard", "comms_logger"}


class RecipeError(ValueError):
    """A recipe value is invalid; the message lists every problem found and the fix."""


def bundled_recipe_path(name: str) -> str:
    """Path of a recipe shipped in ``configs/recipes/`` (``.json`` optional)."""
    filename = name if name.endswith(".json") else f"{name}.json"
    path = _package_files("moduleformer_exit.configs") / "recipes" / filename
    if not path.is_file():
        raise FileNotFoundError(f"No bundled recipe {filename!r}; available: {', '.join(list_recipes())}.")
    return str(path)


def list_recipes() -> list[str]:
    root = _package_files("moduleformer_exit.configs") / "recipes"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_overrides(recipe: dict, overrides: Sequence[str]) -> dict:
    """``["training.max_steps=10", "deepspeed.zero_optimization.stage=2"]``: values parsed as JSON (else string)."""
    recipe = copy.deepcopy(recipe)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"Override {item!r} must look like section.key=value.")
        key, value = item.split("=", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        node = recipe
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"Override {item!r}: {p!r} is not a section.")
        node[parts[-1]] = value
    return recipe


def load_recipe(path_or_name: str | dict, overrides: Sequence[str] = ()) -> dict:
    """Read a recipe (a path, a bundled recipe name, or a dict), apply overrides, fill defaults and validate."""
    if isinstance(path_or_name, dict):
        raw = path_or_name
    else:
        path = path_or_name if os.path.isfile(path_or_name) else None
        if path is None:
            try:
                path = bundled_recipe_path(path_or_name)
            except FileNotFoundError as e:
                raise RecipeError(f"Recipe {path_or_name!r} is neither a file nor a bundled recipe. {e}") from None
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise RecipeError(f"Recipe {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError("A recipe must be a JSON object.")
    raw = apply_overrides(raw, overrides)
    if isinstance(raw.get("exits"), list):  # shorthand: "exits": [2, 4]
        raw["exits"] = {"layers": raw["exits"]}
    recipe = _merge(DEFAULTS, raw)
    validate_recipe(recipe)
    return recipe


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_recipe(recipe: dict) -> None:
    """Raise :class:`RecipeError` listing every invalid value (checked without building anything heavy)."""
    errors: list[str] = []
    for section in recipe:
        if section not in DEFAULTS:
            errors.append(f"unknown section {section!r} (sections: {', '.join(DEFAULTS)})")
    for section in ("exits", "data", "training"):
        if not isinstance(recipe.get(section), dict):
            errors.append(f"{section} must be an object")
            continue
        for key in recipe[section]:
            if key not in DEFAULTS[section]:
                errors.append(f"unknown key {section}.{key} (known: {', '.join(DEFAULTS[section])})")
    if errors:
        raise RecipeError("Invalid recipe:\n  - " + "\n  - ".join(errors))

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    t, d, ds, ex = recipe["training"], recipe["data"], recipe["deepspeed"], recipe["exits"]
    name = recipe.get("name")
    need(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) is not None
         and ".." not in name,
         f"name must be a plain run name (letters, digits, '.', '_', '-'; no '/' or '..'; it names runs/<name>), "
         f"got {name!r}")
    for key in ("max_steps", "log_interval", "eval_interval", "save_interval", "eval_batch_size"):
        need(_is_int(t[key]) and t[key] > 0, f"training.{key} must be a positive integer, got {t[key]!r}")
    need(_is_int(t["keep_checkpoints"]) and t["keep_checkpoints"] >= 1,
         f"training.keep_checkpoints must be an integer >= 1, got {t['keep_checkpoints']!r}")
    need(_is_int(t["warmup_steps"]) and t["warmup_steps"] >= 0,
         f"training.warmup_steps must be an integer >= 0, got {t['warmup_steps']!r}")
    if _is_int(t["warmup_steps"]) and _is_int(t["max_steps"]):
        need(t["warmup_steps"] < t["max_steps"] or t["max_steps"] <= 1,
             f"training.warmup_steps ({t['warmup_steps']}) must be smaller than training.max_steps ({t['max_steps']})")
    need(_is_num(t["lr"]) and 0 < t["lr"] < 1, f"training.lr must be a number in (0, 1), got {t['lr']!r}")
    need(_is_num(t["min_lr_ratio"]) and 0 <= t["min_lr_ratio"] <= 1,
         f"training.min_lr_ratio must be in [0, 1], got {t['min_lr_ratio']!r}")
    need(_is_num(t["weight_decay"]) and t["weight_decay"] >= 0,
         f"training.weight_decay must be >= 0, got {t['weight_decay']!r}")
    need(isinstance(t["betas"], list) and len(t["betas"]) == 2 and all(_is_num(b) and 0 <= b < 1 for b in t["betas"]),
         f"training.betas must be two numbers in [0, 1), got {t['betas']!r}")
    need(_is_num(t["eps"]) and t["eps"] > 0, f"training.eps must be > 0, got {t['eps']!r}")
    need(t["optimizer"] in ("client", "config"),
         f"training.optimizer must be 'client' (torch AdamW passed to DeepSpeed) or 'config' (DeepSpeed's AdamW "
         f"with torch_adam), got {t['optimizer']!r}")
    need(_is_int(t["seed"]), f"training.seed must be an integer, got {t['seed']!r}")
    need(isinstance(t["flush_denormal"], bool), f"training.flush_denormal must be true or false, got "
                                                 f"{t['flush_denormal']!r}")

    need(isinstance(d["files"], (list, str)) and len(d["files"]) > 0, "data.files must be a non-empty list of paths")
    if isinstance(d["files"], (list, str)):
        from .data import check_data_files, resolve_data_files

        try:
            resolved = resolve_data_files(d["files"])
            if d["format"] in ("text", "json", "parquet"):
                check_data_files(resolved, d["format"])
        except (FileNotFoundError, ValueError) as e:
            errors.append(f"data.files: {e}")
    need(d["format"] in ("text", "json", "parquet"), f"data.format must be text, json or parquet, got {d['format']!r}")
    need(d["sample_by"] in ("paragraph", "line", "document"),
         f"data.sample_by must be paragraph, line or document, got {d['sample_by']!r}")
    need(_is_int(d["block_size"]) and d["block_size"] >= 2, f"data.block_size must be an integer >= 2, got "
                                                             f"{d['block_size']!r}")
    need(_is_num(d["heldout_fraction"]) and 0 < d["heldout_fraction"] < 1,
         f"data.heldout_fraction must be in (0, 1), got {d['heldout_fraction']!r}")
    need(_is_int(d["vocab_size"]) and d["vocab_size"] >= 259,
         f"data.vocab_size must be an integer >= 259 (256 bytes + 3 specials), got {d['vocab_size']!r}")
    need(d["tokenizer"] is None or (isinstance(d["tokenizer"], str) and os.path.isdir(d["tokenizer"])),
         f"data.tokenizer must be null (train one) or an existing tokenizer directory, got {d['tokenizer']!r}")
    for key in ("max_train_blocks", "max_heldout_blocks", "num_proc"):
        need(d[key] is None or (_is_int(d[key]) and d[key] > 0),
             f"data.{key} must be null or a positive integer, got {d[key]!r}")
    need(isinstance(d["streaming"], bool), f"data.streaming must be true or false, got {d['streaming']!r}")

    # DeepSpeed section
    if not isinstance(ds, dict):
        errors.append("deepspeed must be an object (a DeepSpeed config)")
    else:
        for key in ds:
            if key not in DS_KEYS:
                errors.append(f"unknown key deepspeed.{key} (supported: {', '.join(sorted(DS_KEYS))})")
        mb, gas = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps")
        need(_is_int(mb) and mb > 0, f"deepspeed.train_micro_batch_size_per_gpu must be a positive integer, got {mb!r}")
        need(_is_int(gas) and gas > 0, f"deepspeed.gradient_accumulation_steps must be a positive integer, got {gas!r}")
        need("train_batch_size" not in ds, "deepspeed.train_batch_size is computed (micro batch x accumulation x "
                                            "processes): remove it")
        need("optimizer" not in ds and "scheduler" not in ds,
             "deepspeed.optimizer / deepspeed.scheduler are set from the training section (training.optimizer, lr, "
             "warmup_steps): remove them")
        clip = ds.get("gradient_clipping", 0.0)
        need(_is_num(clip) and clip >= 0, f"deepspeed.gradient_clipping must be >= 0, got {clip!r}")
        zero = ds.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        need(stage in (0, 1, 2, 3), f"deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        if isinstance(zero, dict) and (zero.get("offload_optimizer") or zero.get("offload_param")) \
                and t["optimizer"] == "client":
            errors.append("ZeRO offload needs DeepSpeed's own optimizer: set training.optimizer to 'config'")
        bf16 = ds.get("bf16", {}).get("enabled", False) if isinstance(ds.get("bf16"), dict) else ds.get("bf16")
        fp16 = ds.get("fp16", {}).get("enabled", False) if isinstance(ds.get("fp16"), dict) else ds.get("fp16")
        need(not (bf16 and fp16), "deepspeed.bf16 and deepspeed.fp16 cannot both be enabled")
        import torch

        need(not fp16 or torch.cuda.is_available(), "deepspeed.fp16 needs a GPU; use bf16 on CPU")

    # model (+ exits): build the config to let it validate itself
    model = recipe["model"]
    init_from = t.get("init_from")
    cfg = None
    if init_from is not None:
        need(isinstance(init_from, str) and os.path.isfile(os.path.join(init_from, "config.json")),
             f"training.init_from must be a save_pretrained model directory (with config.json), got {init_from!r}")
        need(model == {}, "with training.init_from the checkpoint defines the model: leave model empty ({})")
        need(d["tokenizer"] is not None, "with training.init_from set data.tokenizer to the checkpoint's tokenizer "
                                         "directory (its ids must match the model's embedding)")
        if isinstance(init_from, str) and os.path.isfile(os.path.join(init_from, "config.json")):
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(init_from)
    elif not isinstance(model, dict):
        errors.append("model must be an object of ModuleFormerConfig fields")
    else:
        config_class = model_config_class(model.get("model_type", "moduleformer"))
        kwargs = model_config_kwargs(recipe, d["vocab_size"] if _is_int(d["vocab_size"]) else 2048)
        for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):  # the tokenizer's ids
            kwargs.setdefault(key, value)
        if config_class is None:
            errors.append(f"model.model_type must be one of {sorted(MODEL_TYPES)}, got {model.get('model_type')!r}")
        else:
            try:
                cfg = config_class(**kwargs)
            except (ValueError, TypeError) as e:
                errors.append(f"model: {e}")
            if cfg is not None:
                known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
                for key in model:
                    if key not in known and key not in ("vocab_size", "model_type"):
                        errors.append(f"unknown model field {key!r} (not a {config_class.__name__} field)")
    if cfg is not None:
        num_layers = cfg.num_hidden_layers
        layers = ex.get("layers", [])
        need(isinstance(layers, list) and all(_is_int(k) for k in layers),
             f"exits.layers must be a list of layer numbers, got {layers!r}")
        if isinstance(layers, list) and all(_is_int(k) for k in layers):
            bad = [k for k in layers if not 1 <= k <= num_layers]
            need(not bad, f"exits.layers {bad} out of range: the model has {num_layers} layers, exits are "
                          f"1..{num_layers}")
            need(len(set(layers)) == len(layers), f"exits.layers has duplicates: {layers}")
            from types import SimpleNamespace

            from moduleformer_exit.exits import _validate_loss_config

            try:
                _validate_loss_config(SimpleNamespace(num_hidden_layers=num_layers, lm_head_layer_indices=layers,
                                                      **exit_loss_settings(recipe)))
            except ValueError as e:
                errors.append(f"exits: {e} (recipe keys: exits.loss, weighting, shallow_exit, kd_alpha, scale, "
                              f"e_scale, layer_dropout, layer_dropout_scale)")
        need(_is_num(ex.get("loss_weight")) and ex.get("loss_weight") >= 0,
             f"exits.loss_weight must be >= 0, got {ex.get('loss_weight')!r}")
    if errors:
        raise RecipeError("Invalid recipe:\n  - " + "\n  - ".join(errors))


MODEL_TYPES = ("moduleformer", "gpt2", "gpt_neo")


def model_config_class(model_type: str):
    """The config class of a recipe's ``model.model_type`` (None if unknown)."""
    if model_type == "moduleformer":
        from moduleformer_exit import ModuleFormerConfig

        return ModuleFormerConfig
    if model_type == "gpt2":
        from transformers import GPT2Config

        return GPT2Config
    if model_type == "gpt_neo":
        from transformers import GPTNeoConfig

        return GPTNeoConfig
    return None


def exit_loss_settings(recipe: dict) -> dict:
    """The model-config loss fields (see ``moduleformer_exit.exits.LOSS_CONFIG_DEFAULTS``) of ``recipe["exits"]``,
    with the pretraining defaults ``lm_loss_weight = 1``, ``exit_loss_weight = exits.loss_weight``."""
    ex = recipe["exits"]
    return {"lm_loss_weight": 1.0, "exit_loss_weight": float(ex["loss_weight"]) if _is_num(ex["loss_weight"])
            else ex["loss_weight"], "exit_loss_weighting": ex["weighting"], "exit_loss": ex["loss"],
            "shallow_exit": ex["shallow_exit"], "kd_alpha": ex["kd_alpha"], "exit_loss_scale": ex["scale"],
            "exit_loss_e_scale": ex["e_scale"], "layer_dropout": ex["layer_dropout"],
            "layer_dropout_scale": ex["layer_dropout_scale"]}


def model_config_kwargs(recipe: dict, vocab_size: Optional[int] = None) -> dict:
    """The model config's keyword arguments (``model_type`` removed, the tokenizer's vocabulary size filled in)."""
    kwargs = {k: v for k, v in recipe["model"].items() if k != "model_type"}
    if kwargs.get("vocab_size", "tokenizer") == "tokenizer":
        kwargs["vocab_size"] = vocab_size if vocab_size is not None else recipe["data"]["vocab_size"]
    return kwargs
