"""Set-up of a segment: accelerator, base model, latent cache, UNet and text-encoder LoRA,
optimizer and learning-rate schedule; the step runner is built last, from all of them.

Nothing here runs a step: :mod:`lora.train.setup.trainer` hands the parts to the run
(lora/train/run/), which drives the step (lora/train/step/).
"""
