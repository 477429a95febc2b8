"""Real pretrained weights against the reference libraries, on the same folder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ctxvec.loading import load, load_huggingface
from ctxvec.weights.huggingface import minilm_dir, MINILM_SHA256
from ctxvec.weights.tensorfile import sha256_of, WeightsError

WEB = Path(__file__).resolve().parents[2] / "shared" / "data" / "web_en.txt"
LONG_REAL = " ".join(
    WEB.read_text(encoding="utf-8").splitlines()[:40] if WEB.is_file()
    else ["In the beginning, God created the heavens and the earth."] * 40)

TEXTS = [
    "my name is aj",
    "Café crème brûlée at the naïve façade, São Paulo",
    "Grüß Gott! Die Straße in München ist schön, Ärger über Öl.",
    "¿Dónde está la biblioteca? Mañana será otro día, señor.",
    "東京は日本の首都です。北京欢迎你。서울은 한국의 수도입니다.",
    "I love pizza 🍕🔥 and thumbs 👍🏽 and flags 🇪🇸",
    "tab\there\x00nul\x07bell\u200bzero\u00adsoft\x1bescape\r\nnewline",
    "",
    " ",
    "\n\t",
    ".",
    "?!",
    "word " * 300,  # far over the 256-token limit
    LONG_REAL,  # real text over the limit
    "In the beginning God created the heavens and the earth.",
    "The quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def folder() -> Path:
    return minilm_dir()


@pytest.fixture(scope="module")
def pipeline():
    return load("minilm")


def test_shipped_weights_are_the_published_file(folder):
    assert sha256_of(folder / "model.safetensors") == MINILM_SHA256


def test_minilm_config_is_the_bert_variant(pipeline):
    c = pipeline.encoder.config
    assert (c.d_model, c.n_heads, c.d_ff, c.n_layers, c.vocab_size) == (384, 12, 1536, 6, 30522)
    assert (c.position, c.activation, c.norm_first, c.layer_norm_eps) == ("learned", "gelu", False, 1e-12)
    assert c.embedding_norm and c.type_vocab_size == 2 and not c.scale_embeddings
    assert pipeline.max_len == 256
    assert (pipeline.pooling.mode, pipeline.pooling.normalize) == ("mean", True)


def test_token_ids_equal_the_reference_tokenizer(folder, pipeline):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(folder))
    expected = ref(TEXTS, truncation=True, max_length=256)["input_ids"]
    ours = pipeline.tokenizer.tokenize(TEXTS)
    assert [e.ids for e in ours] == expected
    assert [e.truncated for e in ours] == [len(ref(t)["input_ids"]) > 256 for t in TEXTS]


def test_token_vectors_equal_bert_model(folder, pipeline):
    from transformers import BertModel

    ref = BertModel.from_pretrained(str(folder)).eval()
    ours = pipeline.encode(TEXTS)
    worst = 0.0
    for result in ours:
        ids = torch.tensor([result.ids])
        with torch.inference_mode():
            expected = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        worst = max(worst, np.abs(result.vectors - expected.numpy()).max())
    print(f"max abs diff to transformers.BertModel: {worst:.2e}")
    assert worst < 1e-5


def test_sentence_vectors_equal_sentence_transformers(folder, pipeline):
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(folder), device="cpu")
    expected = ref.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    details = pipeline.embed_with_details(TEXTS)
    diff = np.abs(details.vectors - expected).max()
    cosine = (details.vectors * expected).sum(1) / (
        np.linalg.norm(details.vectors, axis=1) * np.linalg.norm(expected, axis=1))
    print(f"max abs diff to sentence-transformers: {diff:.2e}, min cosine {cosine.min():.7f}")
    assert diff < 1e-5 and cosine.min() >= 0.99999
    assert np.allclose(np.linalg.norm(details.vectors, axis=1), 1.0, atol=1e-5)
    assert list(details.truncated) == [False] * 12 + [True, True, False, False]
    assert details.n_tokens[12] == 256 and details.n_tokens_full[12] == 302


def test_results_do_not_depend_on_the_batch(pipeline):
    alone = np.stack([pipeline.embed([t])[0] for t in TEXTS[:6]])
    together = pipeline.embed(TEXTS)[:6]
    tiny_batches = pipeline.embed(TEXTS, batch_tokens=1)[:6]
    assert np.abs(alone - together).max() < 1e-5
    assert np.abs(alone - tiny_batches).max() < 1e-5
    with_long = pipeline.embed([TEXTS[1], LONG_REAL])[0]
    assert np.abs(with_long - alone[1]).max() < 1e-5


def test_results_come_back_in_input_order(pipeline):
    texts = ["a b c d e f g h", "x", "one two three", "y z"]
    forward = pipeline.embed(texts)
    backward = pipeline.embed(texts[::-1])[::-1]
    assert np.abs(forward - backward).max() < 1e-5
    encoded = pipeline.encode(texts)
    assert [r.text for r in encoded] == texts
    assert [r.tokens[1] for r in encoded] == ["a", "x", "one", "y"]


def test_similar_sentences_are_closer(pipeline):
    v = pipeline.embed(["A man is eating food.", "A man is eating a piece of bread.",
                        "The stock market fell sharply today."])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


# ---- strict loading: broken folders are clear errors that name the problem ----------------

@pytest.fixture
def broken(tmp_path, folder):
    """A writable copy of the MiniLM folder, and the way to rewrite its weights."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)

    def rewrite(change):
        tensors = load_file(str(copy / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(copy / "model.safetensors"))
        return copy

    return copy, rewrite


@pytest.mark.parametrize("change, words", [
    (lambda t: t.pop("encoder.layer.3.output.dense.weight"), "missing key.*encoder.layer.3.output.dense.weight"),
    (lambda t: t.update({"encoder.layer.9.extra.weight": torch.zeros(2)}), "unexpected key.*encoder.layer.9.extra"),
    (lambda t: t.update({"encoder.layer.0.intermediate.dense.bias": torch.zeros(10)}),
     "intermediate.*shape \\(10,\\)|feed_forward.up.bias has shape"),
    (lambda t: t.update({"embeddings.LayerNorm.weight": torch.ones(384, dtype=torch.int32)}),
     "embeddings.norm.weight has dtype torch.int32"),
    (lambda t: t["encoder.layer.1.output.dense.bias"].__setitem__(0, float("nan")), "NaN"),
])
def test_broken_weights_are_named(broken, change, words):
    _, rewrite = broken
    with pytest.raises(WeightsError, match=words):
        load_huggingface(rewrite(change))


def test_truncated_weights_file(broken):
    copy, _ = broken
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_huggingface(copy)


def test_config_that_disagrees_with_the_weights(broken):
    copy, _ = broken
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] = 7
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="missing key.*encoder.layer.6"):
        load_huggingface(copy)


def test_tokenizer_that_disagrees_with_the_embedding(broken):
    from ctxvec.loading import seed_tokenizer

    copy, _ = broken
    seed_tokenizer().save(copy / "tokenizer.json")
    with pytest.raises(ValueError, match="the tokenizer has 8000 tokens but the encoder's embedding has 30522 rows"):
        load_huggingface(copy)


def test_sinusoidal_model_cannot_take_bert_positions(broken):
    copy, _ = broken
    config = json.loads((copy / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' is not supported"):
        load_huggingface(copy)


def test_no_pickle_files_are_read(broken):
    copy, _ = broken
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(WeightsError, match="never pickles"):
        load_huggingface(copy)


def test_ctxvec_folder_round_trip(tmp_path, pipeline):
    from ctxvec.loading import save_pipeline

    save_pipeline(pipeline, tmp_path / "saved")
    again = load(tmp_path / "saved")
    texts = ["my name is aj", "word " * 300]
    assert np.array_equal(again.embed(texts), pipeline.embed(texts))
    assert again.max_len == 256 and again.pooling.normalize


@pytest.mark.parametrize("precision", ["bf16"])
def test_bf16_is_close_to_fp32_and_batch_independent(pipeline, precision):
    low = load("minilm", precision=precision)
    reference = pipeline.embed(TEXTS)
    vectors = low.embed(TEXTS)
    assert vectors.dtype == np.float32
    cosine = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.999
    alone = low.embed([TEXTS[2]])[0]
    assert (alone @ vectors[2]) / np.linalg.norm(alone) / np.linalg.norm(vectors[2]) >= 0.9999


# ---- seed-trained: the bundled encoder of the seed's kind, learned from nothing by ctxvec ----

STS_SAMPLE = Path(__file__).parent / "data" / "stsb" / "dev_sample.csv"


def test_seed_trained_is_of_the_seeds_kind_small_and_verified():
    from ctxvec.loading import SEED_TRAINED_SHA256, seed_trained_dir

    folder = seed_trained_dir()
    weights = folder / "model.safetensors"
    assert sha256_of(weights) == SEED_TRAINED_SHA256
    assert weights.stat().st_size < 20_000_000
    assert {t.dtype for t in load_file(str(weights)).values()} == {torch.bfloat16}
    assert (folder / "README.md").is_file()  # its model card: how it was trained, its figures
    pipeline = load("seed-trained")
    c = pipeline.encoder.config
    assert (c.position, c.activation, c.norm_first, c.embedding_norm) == ("sinusoidal", "relu", False, False)
    assert c.d_model % 64 == 0 and c.d_model // c.n_heads == 64
    assert pipeline.embed(["a test"]).dtype == np.float32  # bf16 on disk, fp32 to run


def test_a_changed_seed_trained_file_is_refused(monkeypatch):
    import ctxvec.loading

    monkeypatch.setattr(ctxvec.loading, "SEED_TRAINED_SHA256", "0" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors has sha256 [0-9a-f]{64}, expected 0{64}"):
        load("seed-trained")


def test_seed_trained_has_learned_what_the_untrained_seed_has_not():
    """On STS pairs it ranks similarity far better than the same design with random weights, and
    its attention is focused where the untrained seed's is spread almost evenly."""
    from ctxvec.evaluation import evaluate_pairs

    trained, untrained = load("seed-trained"), load("seed")
    assert evaluate_pairs(trained, STS_SAMPLE).spearman > evaluate_pairs(untrained, STS_SAMPLE).spearman + 10

    def attention_entropy(pipeline) -> float:
        batch = pipeline.tokenizer.encode_batch(["a man is playing a guitar on the stage tonight"])
        with torch.no_grad():
            probs = torch.stack(pipeline.encoder(batch.input_ids, batch.attention_mask,
                                                 output_attentions=True).attentions)  # (L, B, H, T, T)
        return float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())

    assert attention_entropy(trained) < 0.8 * attention_entropy(untrained)


@pytest.mark.parametrize("model", ["minilm", "seed"])
def test_loading_leaves_pytorchs_compiler_unimported(model):
    """Loading checks the file against the config on a "meta" skeleton without drawing or joining
    values there: PyTorch's meta kernels for those import its compiler (torch._dynamo, sympy:
    ~1 s and ~100,000 objects every full garbage collection walks)."""
    code = (f"import sys, ctxvec; ctxvec.load({model!r}).embed(['a text']); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
