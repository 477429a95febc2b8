"""The readable model: the seed's steps, one module each, on padded (B, T, D) tensors.

config -> embedding (steps 2-4: one-hot, token embedding, positions) -> attention (5) ->
layer (6-7: Add & Norm, feed-forward) -> encoder (8: the stack) -> pooling; decoder and
translator for the translation downstream; from_torch reads PyTorch's own Transformer stacks.
``route`` is the one seam through which ``ctxvec.engine`` runs the same modules fast.
"""
