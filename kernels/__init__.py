"""Expert-dispatch and stick-breaking attention kernels (torch paths; Triton GPU paths plug in behind the same API).

This package imports only torch (and triton, lazily, for GPU backends). The model calls:

- :func:`plan_routing` / :class:`RoutingPlan`: sort token->expert assignments on device (no host sync).
- :func:`expert_linear`: routed per-expert linear map, gather -> grouped GEMM -> (gate-weighted) scatter.
- :func:`stick_breaking_attention`: ModuleFormer's stick-breaking attention in O(T*S), chunked.
"""
from .routing import RoutingPlan, plan_routing
from .expert_linear import expert_linear, expert_linear_kernel
from .stick_breaking import stick_breaking_attention, stick_breaking_kernel

__all__ = ["RoutingPlan", "plan_routing", "expert_linear", "expert_linear_kernel", "stick_breaking_attention",
           "stick_breaking_kernel"]
