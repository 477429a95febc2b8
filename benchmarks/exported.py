"""all-MiniLM-L6-v2 exported to ONNX by the benchmark itself, run by the runtimes a user would pick
instead of ctxvec: ONNX Runtime (fp32; int8 by its dynamic quantization) and OpenVINO (fp32; bf16
by its precision hint; int8 by NNCF's post-training quantization).

The exported graph is the whole sentence encoder: Hugging Face's ``BertModel`` on the same
weights, mean pooling over real tokens and L2 normalisation, so that every runtime returns
sentence vectors directly. Each system tokenizes with the model's fast tokenizer inside the
timed run, in length-sorted batches of 32 (what sentence-transformers does; generous to a
runtime that a user would more often feed in input order).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import sorted_batches

BATCH = 32


class MeanPooledBert(nn.Module):
    """(input_ids, attention_mask) (B, T) -> (B, D) L2-normalised mean of the real tokens' vectors."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids)).last_hidden_state  # (B, T, D)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def export_onnx(folder: str, path: Path) -> Path:
    """The sentence encoder as an ONNX file with dynamic batch and sequence axes."""
    from transformers import BertModel

    model = MeanPooledBert(BertModel.from_pretrained(folder, attn_implementation="eager").eval())
    ids = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones_like(ids)
    axes = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "embedding": {0: "batch"}})
    return path


class Batcher:
    """Texts -> length-sorted (order, input_ids, attention_mask) int64 batches of ``BATCH``:
    each text tokenized once, each batch padded to its longest."""

    def __init__(self, folder: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def __call__(self, texts: list[str]):
        encoded = self.tokenizer(texts, truncation=True, max_length=256)
        ids, masks = encoded["input_ids"], encoded["attention_mask"]
        for chunk in sorted_batches([len(x) for x in ids], BATCH):
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in chunk],
                                        "attention_mask": [masks[i] for i in chunk]}, return_tensors="np")
            yield chunk, batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)


def run_batches(batcher: Batcher, infer, texts: list[str]) -> np.ndarray:
    out = None
    for chunk, ids, mask in batcher(texts):
        vectors = infer(ids, mask)
        if out is None:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[chunk] = vectors
    return out


def onnxruntime_runners(onnx_path: Path, workdir: Path, threads: int) -> dict:
    """{"fp32": infer, "int8": infer}: ONNX Runtime on the exported graph, fully optimized, and on
    its dynamic int8 quantization (int8 weights, uint8 activations quantized per tensor at run
    time: ``onnxruntime.quantization.quantize_dynamic``, its documented route for transformers)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = workdir / "minilm_int8.onnx"
    quantize_dynamic(str(onnx_path), str(int8_path), weight_type=QuantType.QInt8)

    def session(path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its idle threads would otherwise spin on the cores for a while after every call, taking
        # them from whichever system runs next in this process (measured: ctxvec bf16 -15%).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda ids, mask: s.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    return {"fp32": session(onnx_path), "int8": session(int8_path)}


def run_batches_async(batcher: Batcher, queue, texts: list[str]) -> np.ndarray:
    """The batches through an OpenVINO ``AsyncInferQueue``: as many in flight as it has requests."""
    out = {}

    def done(request, chunk):
        out[tuple(chunk)] = request.get_output_tensor(0).data.copy()

    queue.set_callback(done)
    for chunk, ids, mask in batcher(texts):
        queue.start_async({"input_ids": ids, "attention_mask": mask}, chunk)
    queue.wait_all()
    vectors = np.zeros((len(texts), next(iter(out.values())).shape[1]), dtype=np.float32)
    for chunk, v in out.items():
        vectors[list(chunk)] = v
    return vectors


def openvino_runners(onnx_path: Path, threads: int, calibration: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """{"fp32", "bf16", "int8"}: OpenVINO on the exported graph with its inference-precision hint
    (f32, bf16), and NNCF's post-training int8 quantization (transformer preset, calibrated on
    ``calibration`` batches, not the timed text) run with OpenVINO's default precision; all three
    in its latency mode (one batch at a time on all threads). "fp32 throughput", "bf16 throughput":
    its throughput mode (batches side by side in its streams, through an ``AsyncInferQueue`` with
    the number of requests it asks for): what OpenVINO offers against ctxvec's streams. The
    sync runners take (ids, mask); the throughput ones are ``AsyncInferQueue``s."""
    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.ERROR)
    core = ov.Core()
    model = core.read_model(str(onnx_path))

    def compiled(m, hint: str | None):
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        c = core.compile_model(m, "CPU", config)
        return lambda ids, mask: c({"input_ids": ids, "attention_mask": mask})[c.output(0)]

    quantized = nncf.quantize(model, nncf.Dataset(calibration, lambda b: {"input_ids": b[0], "attention_mask": b[1]}),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    def throughput(hint: str):
        c = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "THROUGHPUT",
                                              "INFERENCE_PRECISION_HINT": hint})
        return ov.AsyncInferQueue(c, c.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    return {"fp32": compiled(model, "f32"), "bf16": compiled(model, "bf16"), "int8": compiled(quantized, None),
            "fp32 throughput": throughput("f32"), "bf16 throughput": throughput("bf16")}
