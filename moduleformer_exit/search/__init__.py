"""Architecture search for ModuleFormer on the user's device (LTS-style): a search space, training-free quality
proxies, on-device latency / memory measurements, and an evolutionary Pareto search over them."""
from .pareto import dominance_matrix, non_dominated_sort, pareto_front
from .space import DIMENSIONS, Architecture, SearchSpace, SearchSpaceError, load_space, space_from_dict

__all__ = ["Architecture", "DIMENSIONS", "SearchSpace", "SearchSpaceError", "dominance_matrix", "load_space",
           "non_dominated_sort", "pareto_front", "space_from_dict"]
