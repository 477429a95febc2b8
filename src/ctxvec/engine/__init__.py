"""The engine: how the same model runs fast, apart from the model itself.

packing (real tokens as rows), linear (oneDNN at CPU inference, repacked weights, row buckets),
attention (a batched kernel for short sequences), native (self-attention on the packed rows,
C++ compiled for the CPU at hand), route (which of them one forward pass uses,
and why: registered here with ``model.route.register_route``), batching (texts sorted into
batches of few shapes), runtime (precision, threads, memory).
"""

from ctxvec.engine.route import choose
from ctxvec.model.route import register_route

register_route(choose)
