"""The processes of one job, through accelerate: who this process is, its share of the items,
and the one collective step a job needs (gather every process's records, which waits for all).

Started by `torchrun` or `accelerate launch`, accelerate reads the launcher's environment and
joins the process group (NCCL between GPUs, gloo on the CPU); started plainly, it is one process.
"""

from __future__ import annotations

import torch

from ..tasks.shares import Share


class JobProcesses:
    """This process within its job (accelerate's PartialState)."""

    def __init__(self, device: str | None):
        from accelerate import PartialState

        # on the CPU (asked for, or no GPU) accelerate joins the launcher's processes only when told
        # cpu=True (through gloo); with GPUs it joins through NCCL, one GPU per process
        on_cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
        self.state = PartialState(cpu=on_cpu)
        self.share = Share(self.state.process_index, self.state.num_processes)
        # one GPU per process unless a device is named
        self.device = device if device is not None else (str(self.state.device) if self.state.device.type == "cuda" else None)

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def gather(self, records: list) -> list:
        """Every process's `records`, concatenated in process order (the same list on every process)."""
        if self.state.num_processes == 1:
            return list(records)
        from accelerate.utils import gather_object

        return gather_object(list(records))
