"""A method's update as one compiled program (`method.compile: true`).

On a GPU a small network's update is launch-bound: hundreds of small kernels per step around
little arithmetic. A method that opts in writes its update as one pure function of tensors
(no in-place writes to its inputs, no read back to the host) and wraps it in a
`CompiledProgram`: `torch.compile(fullgraph=True, dynamic=False)`, in Inductor's
"reduce-overhead" mode on CUDA, which records the program as a CUDA graph and replays it.

Each method keeps the eager code that owns the stream (shuffles, replay draws, memory writes)
and calls `run(steady, *tensors)`: the compiled program for the shapes it was compiled for
(`steady`), the same function uncompiled for the others (a task's shorter last batch, a memory
still filling up), so nothing recompiles. Users: La-MAML's family (lamaml_compiled.py),
MER (mer.py) and Meta-BGD (meta_bgd.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def clip_total_norm(tensors: Sequence[Tensor], max_norm: float | None) -> list[Tensor]:
    """`nn.utils.clip_grad_norm_` (same eps), out of place: a traceable function."""
    tensors = list(tensors)
    if not max_norm:
        return tensors
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return [t * coef for t in tensors]


class CompiledProgram:
    """`fn` compiled on first use, for the device of its first steady call."""

    backend = "inductor"  # torch.compile's; tests use "aot_eager" (the same trace, no codegen)

    def __init__(self, fn: Callable, mode: str | None = None):
        self.eager = fn
        self.mode = mode
        self._compiled = None  # made on first use, when the device is known
        self.cuda_graphs = False
        self.compiled_calls = self.eager_calls = 0

    def program(self, device: torch.device):
        if self._compiled is None:
            mode = self.mode or ("reduce-overhead" if device.type == "cuda" else None)
            if self.backend != "inductor":
                mode = None  # the modes are Inductor's
            # A method's function is the same code object in every run: Dynamo keeps one cache
            # entry per configuration it saw (its constants: lr, ...) and fails a fullgraph
            # compile past its recompile limit (8), as in a sweep's sequential jobs in one
            # process. A run needs only its own program.
            torch._dynamo.reset()
            if device.type == "cpu":  # Inductor's C++ build warns that it found no CUDA
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            self._compiled = torch.compile(self.eager, fullgraph=True, dynamic=False, mode=mode,
                                           backend=self.backend)
            self.cuda_graphs = mode == "reduce-overhead"
        return self._compiled

    def run(self, steady: bool, device: torch.device, *args):
        """The compiled program (steady shapes) or the eager function (others). Outputs of a
        CUDA graph live in its buffers until the next replay: copy what you keep."""
        if steady:
            program = self.program(device)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            self.compiled_calls += 1
            return program(*args)
        self.eager_calls += 1
        return self.eager(*args)
