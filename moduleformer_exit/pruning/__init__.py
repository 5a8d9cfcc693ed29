"""Expert usage statistics, pruning (smaller checkpoints that reload) and extension with new experts."""
from .layers import KINDS, config_hash, expert_counts, moe_layers, router_fingerprint
from .prune import prune_experts, validate_keep, write_pruning_record

__all__ = ["KINDS", "config_hash", "expert_counts", "moe_layers", "router_fingerprint", "prune_experts",
           "validate_keep", "write_pruning_record"]
from .usage import ExpertUsage, collect_expert_usage  # noqa: E402
from .extend import ExtensionMask, add_experts, freeze_old_experts  # noqa: E402
from .select import select_by_scores  # noqa: E402
from .plan import CRITERIA, choose_keep  # noqa: E402

__all__ += ["ExpertUsage", "collect_expert_usage", "ExtensionMask", "add_experts", "freeze_old_experts",
            "CRITERIA", "select_by_scores", "choose_keep"]
