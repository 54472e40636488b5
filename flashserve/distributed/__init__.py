"""Tensor parallelism over ``torch.distributed``: the process group and its workers (``launch``), the group's
rank, size and collectives (``state``), the split layers (``layers``), the checks of a split (``checks``) and the
per-step metadata broadcast (``steps``)."""
