"""CUDA graphs for a static function: capture once per input signature, then replay.

A training step or an evaluation batch is launch-bound on a GPU: thousands of small kernels
whose launch costs more than their work. Captured as a CUDA graph, the whole step is one
launch. That needs a static function (no host reads, no Python branch on a tensor's value,
the same shapes every call), which the bounds and the trainer's step are (tests/test_static.py).

`Graphed(fn)` calls fn(*args) for a pytree of tensors (and Python values):
- the first call with a new signature (tree structure, shapes, dtypes, devices, non-tensor
  values) runs fn eagerly on a side stream: a real call, and the warm-up that lazy state
  (optimiser moments, the allocator, library handles) needs before capture;
- the second call captures fn into a graph reading from static input tensors, then replays it;
  later calls copy their inputs into those tensors and replay;
- outputs are returned as fresh tensors (the graph's own are overwritten at the next replay);
- a signature whose capture fails (an op that cannot be captured) is named in one warning and
  runs eagerly from then on; beyond `max_graphs` signatures new ones run eagerly.

`capture` is the capturing backend: CUDA's by default; tests of the bookkeeping on a machine
without a GPU pass their own. Random numbers: CUDA graphs advance the default generator's
offset at every replay, so every replay draws fresh noise.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["Graphed", "cuda_capture", "STATIC_SPAN"]

STATIC_SPAN = 32  # static shapes (graphs, compile) pad a sequence batch's time axis to a multiple of this (without TBPTT)


def cuda_capture(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """Capture fn() (which reads static tensors) as a CUDA graph; returns replay(), which runs the
    graph and returns the capture's outputs (the graph's static tensors, overwritten by each replay)."""
    graph = torch.cuda.CUDAGraph()
    # the outer stream context restores the current stream even when the capture fails (torch.cuda.graph's
    # exit ends the capture before it restores the stream, and a failed end raises)
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)), torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def _eager_on_side_stream(fn: Callable[[], Any], device: torch.device) -> Any:
    """Run fn() on a side stream (the warm-up that capture needs), ordered with the current stream."""
    if device.type != "cuda":
        return fn()
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn()
    current.wait_stream(side)
    return out


class Graphed:
    """fn replayed from CUDA graphs, one per input signature (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], *, max_graphs: int = 8,
                 capture: Callable[[Callable[[], Any], torch.device], Callable[[], Any]] = cuda_capture,
                 name: str = "step", reset: Callable[[], None] | None = None):
        self.fn = fn
        self.max_graphs = max_graphs
        self.capture = capture
        self.name = name
        self.reset = reset  # called after a failed capture, before the eager call: undo what the aborted one left
        self.graphs: dict[Any, tuple[Callable[[], Any], list[Tensor]]] = {}
        self.warm: set[Any] = set()  # signatures run once (eagerly), ready to capture
        self.eager: set[Any] = set()  # signatures that run eagerly for good
        self.replays = 0  # calls answered by a replay (for tests and benchmarks)

    @staticmethod
    def _signature(flat: list[Any], spec) -> Any:
        return (str(spec), tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, Tensor) else ("value", v) for v in flat))

    def __call__(self, *args: Any) -> Any:
        flat, spec = tree_flatten(args)
        key = self._signature(flat, spec)
        entry = self.graphs.get(key)
        if entry is None and key in self.warm:  # the second call: capture
            device = next(v.device for v in flat if isinstance(v, Tensor))
            entry = self._capture(key, flat, spec, device)
        if entry is None:
            if key in self.eager:
                return self.fn(*args)
            if len(self.graphs) + len(self.warm) >= self.max_graphs:
                self.eager.add(key)
                return self.fn(*args)
            self.warm.add(key)  # the first call: a warm-up, then capture next time
            device = next((v.device for v in flat if isinstance(v, Tensor)), torch.device("cpu"))
            return _eager_on_side_stream(lambda: self.fn(*args), device)
        replay, static = entry
        for target, value in zip(static, (v for v in flat if isinstance(v, Tensor))):
            target.copy_(value)
        out = replay()
        self.replays += 1
        return tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, out)

    def _capture(self, key, flat: list[Any], spec, device: torch.device):
        static = [v.detach().clone() for v in flat if isinstance(v, Tensor)]
        tensors = iter(static)
        inputs = tree_unflatten([next(tensors) if isinstance(v, Tensor) else v for v in flat], spec)
        self.warm.discard(key)
        try:
            replay = self.capture(lambda: self.fn(*inputs), device)
        except Exception as err:  # an op that cannot be captured: this signature runs eagerly
            self.eager.add(key)
            if self.reset is not None:
                self.reset()
            warnings.warn(f"CUDA graph capture of the {self.name} failed ({type(err).__name__}: {err}); "
                          "this input shape runs eagerly", RuntimeWarning, stacklevel=3)
            return None
        entry = (replay, static)
        self.graphs[key] = entry
        return entry
