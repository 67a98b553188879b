"""The stream pipeline: source → enrich → normalize → sink, with checkpoints, HA, fleets and alert updates."""
