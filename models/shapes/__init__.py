"""The shapes domain: procedural scenes and their grammar (`scenes`), a non-learned reading (`geometry`), the
near-miss corpus (`near_miss`)."""
