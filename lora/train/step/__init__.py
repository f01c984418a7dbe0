"""One optimizer step, read top to bottom: pipeline.py (queued, read back in order) ->
runner.py (seeds, inputs, executor, the learning rate) -> executor.py / graphed.py (forward,
backward, optimizer) with loss.py (the one loss) and inputs.py (draws, cached latents, text)."""
