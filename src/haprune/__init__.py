"""haprune: Hessian-aware structured pruning with Neural Implants for PyTorch models.

The steps, each a module with a small API:

    structures = haprune.build_structures(model, example_inputs)          # graph: what is coupled
    sens = estimate(model, structures, calibration_batches)               # from haprune.estimate import estimate
    plan = haprune.make_plan(structures, sens.scores,
                             haprune.CostModel(model, structures, example_inputs), target=0.5)   # plan
    pruned = haprune.apply_plan(model, plan, example_inputs, structures=structures)           # apply
    haprune.recover.finetune(pruned, train_data, val_data, FinetuneConfig(...))               # recover
    deployed = haprune.merge_implants(pruned)   # each implanted layer as one k x k conv, for inference/export
"""
from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .lazy import lazy_attributes

# The names below are imported on first use (PEP 562), so that ``import haprune`` -- which every ``haprune``
# command does first -- does not cost the seconds of importing torch: ``haprune --help`` answers at once.
_LAZY = {"build_structures": "graph", "StructureSet": "graph", "Sensitivity": "estimate", "make_plan": "plan",
         "Plan": "plan", "CostModel": "plan", "apply_plan": "apply", "merge_implants": "apply",
         "ImplantConv2d": "apply"}

if TYPE_CHECKING:  # for type checkers and IDEs
    from .apply import ImplantConv2d, apply_plan, merge_implants
    from .estimate import Sensitivity
    from .graph import StructureSet, build_structures
    from .plan import CostModel, Plan, make_plan


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = ["__version__", "build_structures", "StructureSet", "Sensitivity", "make_plan", "Plan",
           "CostModel", "apply_plan", "merge_implants", "ImplantConv2d"]
