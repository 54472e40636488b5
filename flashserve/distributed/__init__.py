"""Tensor parallelism over ``torch.distributed``: joining or starting the group and its workers (``launch``), the
group's rank, size and collectives (``state``), the split layers (``layers``) and the checks that a model can be
split (``checks``). The per-step broadcast of rank 0's inputs is the runner's (``ModelRunner.run`` / ``follow``
over ``InputBuffers``' arena)."""
