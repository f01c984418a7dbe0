"""Data-set building blocks: image preparation, captions, near-duplicate detection, manifests."""
