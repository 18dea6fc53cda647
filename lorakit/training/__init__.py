"""The training loop's machinery, which only `lorakit train` uses: optimizer and schedule,
one optimizer step, signals, saving from several processes, and what the run shows."""
