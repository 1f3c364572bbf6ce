"""The networks (SigLIP, RQ codebooks, depth transformer, pixel decoder, projector, LLM) and `VilaUModel`,
which assembles them from a checkpoint."""
