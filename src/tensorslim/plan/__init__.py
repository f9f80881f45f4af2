"""Plans and allocators: which layers to factorize, with which method and rank, under a budget."""

from tensorslim.plan.allocate import ALLOCATORS, DENSE, Candidate, global_, uniform
from tensorslim.plan.plan import LayerPlan, Plan

__all__ = ["ALLOCATORS", "DENSE", "Candidate", "LayerPlan", "Plan", "global_", "uniform"]
