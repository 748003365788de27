"""Controllers: how deep to draft and how many nodes to verify, every cycle.

- :mod:`ltd.control.base` -- the static tree and the range checks of its settings.
- :mod:`ltd.control.learned` -- trained LTD policies and transformers' +2/-1 heuristic.
- :mod:`ltd.control.throughput` -- greedy expected throughput from the machine's measured costs.
- :mod:`ltd.control.suffix_rule` -- SuffixDecoding's rule (the whole suffix trie, all verified).
- :mod:`ltd.control.schedule` -- a fixed table of draft length by batch size (vLLM, TensorRT-LLM).
- :mod:`ltd.control.costs` -- the cost table (:class:`LatencyModel`); :mod:`ltd.control.measure`
  measures it, :mod:`ltd.control.costcache` keeps the quick profile per machine.
- :mod:`ltd.control.policy` -- loading trained policies (the MLP runner) for inference.
- :mod:`ltd.control.spaces` -- the observations the policies see, live and in training.

The protocol they implement is :mod:`ltd.controller` (below the cycle, which asks it);
training the policies is :mod:`ltd.rl`'s job, which imports this package, never the
reverse.
"""

from ltd.control.base import MAX_DEPTH, MAX_SIZE, MAX_TOPK, ControllerBase, StaticController, validate_static
from ltd.control.costs import LatencyModel
from ltd.control.learned import HeuristicController, LTDController
from ltd.control.schedule import ScheduleController
from ltd.control.suffix_rule import SuffixRuleController
from ltd.control.throughput import ThroughputController
from ltd.controller import Controller, DraftStepState

__all__ = [
    "MAX_DEPTH", "MAX_SIZE", "MAX_TOPK", "Controller", "ControllerBase", "DraftStepState", "HeuristicController",
    "LTDController", "LatencyModel", "ScheduleController", "StaticController", "SuffixRuleController", "ThroughputController",
    "validate_static",
]
