"""Expert usage statistics, pruning (smaller checkpoints that reload) and extension with new experts."""
from .layers import KINDS, config_hash, expert_counts, moe_layers, router_fingerprint
from .prune import prune_experts, validate_keep, write_pruning_record

__all__ = ["KINDS", "config_hash", "expert_counts", "moe_layers", "router_fingerprint", "prune_experts",
           "validate_keep", "write_pruning_record"]
