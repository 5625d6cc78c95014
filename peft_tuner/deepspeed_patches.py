"""Every place where this project reaches into DeepSpeed beyond its public API, with the versions it was tested on.

- `import_deepspeed`: DeepSpeed imported without its autotuner's module-level `import mlflow`.
- `index_release_decisions`: ZeRO-3's choice of which gathered weights to release after a module, answered from an
  index of the recorded trace instead of DeepSpeed's walk (below).
- `start_trace_afresh`: ZeRO-3's trace dropped after forwards outside the training steps.

Each is applied only where `train.deepspeed_patches` is on (the default) and DeepSpeed's version is one of
TESTED_VERSIONS; elsewhere DeepSpeed's own behaviour runs, and the start record says which (`deepspeed_patches`).
The patched and unpatched runs give the same losses (tests/test_launchers.py).

The release decisions. Under ZeRO-3, DeepSpeed records the order in which modules run (forward and backward) during
the first steps. Once that trace is complete, each module's weights are released after it runs unless the trace uses
them again within `stage3_max_reuse_distance` parameters. DeepSpeed 0.19 answers that by walking the rest of the trace
from the current module on, module by module, the first time each (module, position) comes up: with the default
distance (1e9, more than a 135M model holds) every walk reaches the end of the trace, so the first step that runs on
the complete trace makes about n^2 / 2 module visits. LoRA multiplies n: on SmolLM2-135M with LoRA on every linear
layer under ZeRO-3 on 2 CPU processes that step took 15.4 s against 3.3 s for the steps after it. The index keeps,
per trace, the running parameter count and each weight's positions, so that each question is two binary searches per
weight; the answers are the same sets (tested against DeepSpeed's walk on every position of a recorded trace), kept
per module and position as DeepSpeed keeps its own, and keyed by the trace, so a trace recorded again is not
answered from the old one. Modules marked as ZeRO-3 leaves keep DeepSpeed's walk.
"""
from __future__ import annotations

import bisect
import importlib
import itertools
import sys

_PATCHED = "_peft_tuner_indexed_release"
_METHOD = "_PartitionedParameterCoordinator__params_to_release"
_STATE = ("submodule_order", "most_recent_step_id_param_fetched_for", "max_reuse_dist_in_numel")  # what it reads
TESTED_VERSIONS = ("0.17", "0.18", "0.19")  # major.minor


def import_deepspeed():
    """deepspeed, imported without its autotuner's `import mlflow` at module level: where mlflow is installed (it is an
    extra of ours), that import cost every process 1.3 s and about 105 MB of resident memory (measured, 2-core CPU) for
    a tuner this project never runs. mlflow stays importable afterwards, for train.report_to."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which the autotuner catches
        try:
            importlib.import_module("deepspeed")
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def version_tested() -> bool:
    """Whether the installed DeepSpeed is one the patches here were tested on."""
    import deepspeed

    return ".".join(deepspeed.__version__.split(".")[:2]) in TESTED_VERSIONS


def apply(enabled: bool, zero_stage: int) -> dict:
    """Put the patches a run under `zero_stage` uses in place (or take them out, `enabled` false); what is in force,
    for the start record."""
    import deepspeed

    tested = version_tested()
    indexed = index_release_decisions(enabled and tested and zero_stage == 3)
    state = "on" if enabled and tested else ("off" if not enabled else f"off: DeepSpeed {deepspeed.__version__} is not "
                                              f"one of the tested {', '.join(TESTED_VERSIONS)}")
    return {"state": state, "zero3_release": "indexed" if indexed else ("deepspeed" if zero_stage == 3 else None)}


_ON = [False]  # whether the patches are on in this process (apply's last call)


def index_release_decisions(enabled: bool = True) -> bool:
    """Answer ZeRO-3's release question from an index of the trace, or (enabled false) put DeepSpeed's walk back;
    whether the index is in place."""
    _ON[0] = enabled
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
        from deepspeed.utils.z3_leaf_module import z3_leaf_module
    except ImportError:
        return False
    walk = getattr(PartitionedParameterCoordinator, _METHOD, None)
    if walk is None:
        return False
    if getattr(walk, _PATCHED, False):
        if not enabled:
            setattr(PartitionedParameterCoordinator, _METHOD, walk.deepspeed_walk)
        return enabled
    if not enabled:
        return False

    def params_to_release(self, submodule, step_id: int) -> set[int]:
        state = [getattr(self, f"_PartitionedParameterCoordinator__{name}", None) for name in _STATE]
        if z3_leaf_module(submodule) or not self.is_complete_trace() or any(s is None for s in state):
            return walk(self, submodule, step_id)  # DeepSpeed's own walk (and its error for an incomplete trace)
        trace, fetched_for, distance = state
        index = getattr(self, "_peft_tuner_trace_index", None)
        if index is None or index.trace is not trace:
            index = self._peft_tuner_trace_index = TraceIndex(trace)
        if (submodule, step_id) not in index.answers:
            index.answers[submodule, step_id] = index.params_to_release(submodule, step_id, distance, fetched_for)
        return index.answers[submodule, step_id]

    setattr(params_to_release, _PATCHED, True)
    params_to_release.deepspeed_walk = walk
    setattr(PartitionedParameterCoordinator, _METHOD, params_to_release)
    return True


def module_params(module) -> list:
    """A module's own weights as ZeRO-3 counts them for a module that is not a leaf: its direct parameters, then
    the external ones registered on it."""
    return [p for _, p in itertools.chain(module.named_parameters(recurse=False), module.ds_external_parameters())]


class TraceIndex:
    """For one recorded trace (a tuple of modules): the running count of the weights the trace uses, module by
    module, and for each weight the positions of the modules that use it."""

    def __init__(self, trace):
        self.trace = trace
        self.running = [0]  # running[k]: weights (numel) used by trace[:k]
        self.uses: dict[int, list[int]] = {}  # ds_id -> positions in the trace, ascending
        for position, module in enumerate(trace):
            params = module_params(module)
            self.running.append(self.running[-1] + sum(p.ds_numel for p in params))
            for p in params:
                self.uses.setdefault(p.ds_id, []).append(position)
        self.answers: dict = {}

    def params_to_release(self, submodule, step_id: int, distance: int, fetched_for) -> set[int]:
        """The ds_ids of `submodule`'s weights to release at trace position `step_id`: not persistent, not already
        prefetched for a later use, and not used again by the modules that DeepSpeed's walk visits, those from
        `step_id` on whose preceding weights (counted from `step_id`) are still fewer than `distance`."""
        start = min(step_id, len(self.trace))
        end = min(len(self.trace), bisect.bisect_left(self.running, self.running[start] + distance, lo=start))
        release = set()
        for p in module_params(submodule):
            if p.ds_persist or fetched_for[p] > step_id:
                continue
            uses = self.uses.get(p.ds_id, [])
            later = bisect.bisect_left(uses, start)
            if later == len(uses) or uses[later] >= end:  # not used again within the distance
                release.add(p.ds_id)
        return release


def start_trace_afresh(engine) -> None:
    """Forward passes outside the training steps (the padding-free check, an evaluation) leave ZeRO-3 a trace that
    the next step does not follow: that step finds out part way, runs on, and only the step after it records, so two
    steps run untraced (no prefetch, every weight gathered twice). With the trace dropped now, the next step records
    it and the one after uses it. A no-op below ZeRO-3, and where the patches are off."""
    if not _ON[0]:
        return
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
