"""The training loop's machinery (`lorakit train`; `lorakit plan --probe` times its steps): the
objective, optimizer and schedule, one optimizer step, signals, saving from several processes,
and what the run shows."""
