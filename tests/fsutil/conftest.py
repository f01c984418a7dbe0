"""tests/fsutil: the crash-safe file primitives of lora.fsutil (real files in tmp_path, no fixtures needed)."""
