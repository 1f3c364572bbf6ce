"""Reading a published VILA-U checkpoint: its configs, weights, tokenizer, the hub, the latent-space id.

Lowest layer above `errors`: nothing here imports the networks or anything above them.
"""
