"""SIGINT / SIGTERM during training: finish the current optimizer step, write a checkpoint and
stop (a second Ctrl-C aborts at once)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class TrainingStopped(Exception):
    """A signal stopped the run after a complete optimizer step and a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {SIGNAL_NAMES[signum]} after step {step}")


class StopOnSignal:
    """SIGINT / SIGTERM during training: finish the current optimizer step, write a checkpoint
    and stop. A second Ctrl-C aborts at once. Repeated SIGTERMs are ignored: launchers
    (torchrun, SLURM) forward the same stop request to every process."""

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        if self.announce:
            print(
                f"\n{SIGNAL_NAMES[signum]}: finishing this optimizer step and writing a "
                "checkpoint (Ctrl-C again aborts at once)",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal any process received (0 for none), the same answer on every process so
        they all stop at the same step."""
        received = self.received or 0
        if accelerator.num_processes == 1:
            return received
        flags = accelerator.gather(torch.tensor([received], device=accelerator.device))
        return int(flags.max())
