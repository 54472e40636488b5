"""CUDA graphs of decode-only steps: the whole forward pass of a decode batch replayed in one launch.

A decode step of the eager engine is bound by the host (hundreds of kernel launches, each a few µs of Python and
driver work, for about a millisecond of GPU work on a small model). At start-up ``DecodeGraphs`` captures the
forward pass — embedding, every layer, the final norm and the LM head — once per padded batch size
(``capture_sizes``), largest first, all graphs sharing one memory pool (only one replays at a time). A decode batch
of ``n`` requests replays the smallest captured size ``>= n``: the input buffers' padding rows (slot -1, KV length
0) make the extra rows write nothing and read nothing, and their logits are ignored. Sampling has graphs of its own
(``flashserve.engine.decode_sampling``), captured into the same pool, which read the logits buffer. Sizes from
``cascade_sizes`` get a second graph whose attention is cascade attention over the shared prefix length the input
buffers hold (``flashserve.engine.cascade``).

What makes this safe: the step's inputs live in persistent device buffers (``InputBuffers``) whose addresses never
change, the forward pass does not synchronise with the host, and no launch inside it depends on host-side
knowledge of the sequence lengths (the decode kernel's split layout is chosen from the block table's width, i.e.
for ``max_model_len``; splits past a sequence's end exit at once). Every kernel variant is compiled by an eager run
of the same size just before its capture.
"""
import bisect

import torch
from tqdm.auto import tqdm

from flashserve.context import set_context
from flashserve.engine.cascade import with_shared_prefix
from flashserve.engine.input_buffers import InputBuffers


def capture_sizes(max_capture_size: int, largest_batch: int) -> list[int]:
    """The padded batch sizes to capture, ascending: 1, 2, 4, 8, every 8 up to 256, then every 16 up to
    ``max_capture_size`` — cut after the first size that holds ``largest_batch`` (the most requests a decode step
    can have: ``min(max_num_seqs, max_num_batched_tokens)``; larger graphs would never replay)."""
    candidates = [1, 2, 4, 8, *range(16, 257, 8), *range(272, max_capture_size + 1, 16)]
    sizes = []
    for size in candidates:
        if size > max_capture_size:
            break
        sizes.append(size)
        if size >= largest_batch:
            break
    return sizes


class DecodeGraphs:
    """Captured decode forward passes of a model, one per padded batch size.

    Args:
        model: the decoder (``forward(input_ids, positions)`` and ``compute_logits(hidden)``).
        inputs: the runner's persistent input buffers (their device tensors are the graphs' inputs).
        sizes: the padded batch sizes to capture (``capture_sizes``).
        vocab_size: columns of the logits.
        cascade_sizes: the sizes that also get a cascade-attention graph (none by default).

    Attributes:
        sizes: the captured sizes, ascending.
        memory_bytes: device memory the capture reserved (the graphs' pool and their logits buffer), measured as
            the growth of PyTorch's reserved memory.
        pool: the graphs' memory pool (after ``capture``), for other graphs replayed between theirs.
    """

    def __init__(self, model: torch.nn.Module, inputs: InputBuffers, sizes: list[int], vocab_size: int,
                 cascade_sizes: list[int] = ()):
        self.model = model
        self.inputs = inputs
        self.sizes = sorted(sizes)
        self.device = inputs.device
        self.vocab_size = vocab_size
        self.logits: torch.Tensor | None = None
        self.cascade_sizes = set(cascade_sizes)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.memory_bytes = 0
        self.pool = None

    @property
    def max_size(self) -> int:
        """The largest captured batch size."""
        return self.sizes[-1]

    def padded_size(self, num_reqs: int) -> int | None:
        """The captured size a decode batch of ``num_reqs`` requests replays, or None when it must run eagerly."""
        if num_reqs > self.sizes[-1]:
            return None
        return self.sizes[bisect.bisect_left(self.sizes, num_reqs)]

    @torch.inference_mode()
    def capture(self, show_progress: bool = True) -> None:
        """Capture every size (and cascade variant), largest first (smaller graphs reuse the largest one's
        memory)."""
        torch.cuda.synchronize(self.device)
        reserved_before = torch.cuda.memory_reserved(self.device)
        self.logits = torch.empty((self.sizes[-1], self.vocab_size), dtype=torch.float32, device=self.device)
        pool = self.pool = torch.cuda.graph_pool_handle()
        keys = [(size, cascade) for size in sorted(self.sizes, reverse=True)
                for cascade in (False, True) if not cascade or size in self.cascade_sizes]
        for size, cascade in tqdm(keys, desc="Capturing CUDA graphs", unit="graph", disable=not show_progress,
                                  leave=False):
            step_inputs = self.inputs.prepare_padding(size)
            context = step_inputs.context
            if cascade:
                context = with_shared_prefix(context, self.inputs.shared_prefix_len.device)
            set_context(context)
            try:
                self._forward(step_inputs, size)  # compiles every kernel variant of this size before capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(step_inputs, size)
            finally:
                set_context(None)
            self.graphs[size, cascade] = graph
        torch.cuda.synchronize(self.device)
        self.memory_bytes = torch.cuda.memory_reserved(self.device) - reserved_before

    def _forward(self, step_inputs, size: int) -> None:
        hidden = self.model(step_inputs.input_ids, step_inputs.positions)
        self.logits[:size].copy_(self.model.compute_logits(hidden))

    def release(self) -> None:
        """Free every graph (before a tensor-parallel group is destroyed: NCCL cannot tear down a communicator
        whose kernels live in graphs)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        torch.cuda.synchronize(self.device)

    @property
    def num_graphs(self) -> int:
        """How many graphs are captured (plain and cascade)."""
        return len(self.graphs)

    def replay(self, size: int, cascade: bool = False) -> torch.Tensor:
        """Run the graph of ``size`` (its cascade-attention variant when ``cascade``, a size of ``cascade_sizes``) on
        what the input buffers hold; returns its logits (size, vocab) fp32 — a view of a buffer that the next replay
        overwrites."""
        self.graphs[size, cascade].replay()
        return self.logits[:size]
