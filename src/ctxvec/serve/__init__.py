"""ctxvec serve: the embedding server applications call (OpenAI's ``/v1/embeddings`` and more).

``worker`` (owns the model, batches across requests, computes in streams), ``schemas`` (requests and
errors in OpenAI's shapes), ``metrics`` (Prometheus), ``app`` (the endpoints, behind one door:
auth, drain, logs), ``server`` (uvicorn, and the drain on SIGTERM).
"""

from ctxvec.serve.app import ServeSettings, create_app
from ctxvec.serve.server import serve

__all__ = ["ServeSettings", "create_app", "serve"]
