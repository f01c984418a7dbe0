"""The peers bench/e2e.py times beside `animelora train` (kohya sd-scripts; the diffusers script
needs no helper). Nothing here is imported by the project itself: bench/ only."""
