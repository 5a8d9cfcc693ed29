"""lm-evaluation-harness 0.4 integration (``pip install -e ".[eval]"``): the ``moduleformer-exit`` model type, the
shipped offline Austen tasks, a ``simple_evaluate`` helper and the ``moduleformer-exit eval`` launcher.

Importing this package does not import lm-eval; :func:`register` (called by everything that needs it) does.
Tasks (``tasks/``, tag ``austen``): ``austen_heldout_ppl`` (rolling perplexity on the quickstart's held-out
paragraphs), ``austen_lastword`` (LAMBADA-style last-word log-likelihood and accuracy) and ``austen_lastword_gen``
(the same through greedy generation, exact match).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

TASKS_DIR = Path(__file__).parent / "tasks"
MODEL_TYPE = "moduleformer-exit"


def require_lm_eval() -> None:
    """Raise a clear ImportError when lm-eval (the ``eval`` extra) is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise ImportError(f"moduleformer_exit.evaluation needs lm-eval 0.4 ({error}): "
                          "pip install \"moduleformer-exit[eval]\" (or pip install \"lm-eval>=0.4.13,<0.5\").") from None


def register() -> type:
    """Register the ``moduleformer-exit`` model type with lm-eval (idempotent) and return its class."""
    require_lm_eval()
    from .lm_eval_model import MultiExitLM

    return MultiExitLM


def include_paths(include_path: Union[None, str, Path, Sequence[Union[str, Path]]] = None) -> list[str]:
    """The shipped tasks' directory followed by ``include_path`` (one path or several)."""
    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else include_path
    return [str(TASKS_DIR)] + [str(p) for p in extra]


def task_manager(include_path: Union[None, str, Path, Sequence[Union[str, Path]]] = None,
                 include_defaults: bool = True, **kwargs: Any):
    """An lm-eval ``TaskManager`` that knows the shipped tasks (and lm-eval's own unless ``include_defaults=False``,
    which also skips indexing lm-eval's thousands of task files)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_paths(include_path), include_defaults=include_defaults, **kwargs)


def evaluate(pretrained: Any, tasks: Union[str, Sequence[str]] = ("austen",),
             model_args: Union[None, str, dict] = None, *, include_path: Any = None, include_defaults: bool = True,
             **kwargs: Any) -> dict:
    """``lm_eval.simple_evaluate`` with the ``moduleformer-exit`` model type and the shipped tasks.

    ``pretrained``: a checkpoint path, a model object (multi-exit or not), or an lm-eval ``LM`` (then ``model_args``
    must be empty). ``model_args``: ``"k=v,k2=v2"`` (lm-eval's syntax) or a dict, e.g.
    ``"use_original_head=false,contrast_layer_indices='original;12'"``. Other keyword arguments go to
    ``simple_evaluate`` (``limit``, ``batch_size``, ``num_fewshot``, ``log_samples``, ...). Returns its result dict
    (``results[task][metric + ",none"]``); print it with ``lm_eval.utils.make_table``.
    """
    register()
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.utils import simple_parse_args_string

    if isinstance(tasks, str):
        tasks = tasks.split(",")
    manager = task_manager(include_path, include_defaults)
    if isinstance(pretrained, LM):
        if model_args:
            raise ValueError("model_args cannot be combined with an already built LM; configure the LM instead.")
        return simple_evaluate(model=pretrained, tasks=list(tasks), task_manager=manager, **kwargs)
    args = simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {})
    if "pretrained" in args:
        raise ValueError("Pass the model as `pretrained`, not inside model_args.")
    kwargs.setdefault("log_samples", False)
    return simple_evaluate(model=MODEL_TYPE, model_args={"pretrained": pretrained, **args}, tasks=list(tasks),
                           task_manager=manager, **kwargs)
