"""The stream pipeline: source → enrich → normalize → sink, with checkpoints and the HA leader."""
