"""Delivery of approved images: placements (size, fit, pad colour), encoding with provenance, the manifest."""
