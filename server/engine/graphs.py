"""CUDA graphs of the decode step, one per shape key, captured on first use and replayed after.

A decode step launches hundreds of small kernels (7 projections, 4 LoRA shrinks and 7 expands,
attention and norms per layer); launched one by one from Python they cost far more than the
weights take to read. Replaying a captured graph launches them all at once. The step reads and
writes only the batch's preallocated state, so a replay needs no arguments: the host updates the
state tensors in place before it.

If capture fails (a kernel that syncs with the host, say), that key runs eagerly from then on and
the reason is logged once: slower, never wrong.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


class StepGraphs:
    def __init__(self, step: Callable[..., None], state_tensors: Callable[[], list[torch.Tensor]]):
        self.step = step
        self.state_tensors = state_tensors
        self.graphs: dict[tuple, torch.cuda.CUDAGraph | None] = {}
        self.pool = None

    def run(self, *key) -> None:
        graph = self.graphs.get(key, False)
        if graph is False:
            graph = self._capture(key)
            self.graphs[key] = graph
        if graph is None:
            self.step(*key)
        else:
            graph.replay()

    def _capture(self, key: tuple) -> torch.cuda.CUDAGraph | None:
        # Warm-up and capture must not advance the state: save it, and put it back before the replay.
        saved = [t.clone() for t in self.state_tensors()]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.step(*key)  # compiles Triton kernels, sizes cuBLAS workspaces
                self._restore(saved)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(*key)
            self.pool = graph.pool()
            return graph
        except Exception as e:  # noqa: BLE001 - fall back to eager for this key, loudly
            log.warning("decode step %s could not be captured as a CUDA graph; running it eagerly: %s", key, e)
            torch.cuda.synchronize()
            return None
        finally:
            self._restore(saved)

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self.state_tensors(), saved):
            t.copy_(s)
