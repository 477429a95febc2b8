"""Fine-tuning sentence vectors: the losses against sentence-transformers', exact resume, many
processes, the best checkpoint as the run's model, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import ctxvec
from ctxvec.cli import main
from ctxvec.evaluation import evaluate_pairs
from ctxvec.loading import save_pipeline, seed_tokenizer
from ctxvec.model.encoder import Encoder
from ctxvec.model.pooling import Pooling
from ctxvec.pairs import read_scored_pairs
from ctxvec.pipeline import Pipeline
from ctxvec.train.finetune import FinetuneConfig, FinetuneTrainer
from ctxvec.train.losses import cosent_loss, mnrl_loss
from ctxvec.weights.checkpoint import load_checkpoint

from conftest import tiny_config

DATA = Path(__file__).parent / "data" / "stsb"
TRAIN, DEV = DATA / "train_sample.csv", DATA / "dev_sample.csv"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A small seed-style encoder with the seed's tokenizer, mean pooling + normalisation."""
    tokenizer = seed_tokenizer(max_len=64)
    config = tiny_config(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, max_len=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pipeline(Pipeline(tokenizer, Encoder(config), Pooling("mean", normalize=True)), folder, "tiny")
    return folder


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> Path:
    """(anchor, positive, negative) rows made of STS pairs: a high-scored pair and a low one's sentence."""
    pairs = read_scored_pairs(TRAIN)
    high = [i for i, s in enumerate(pairs.scores) if s >= 3.0]
    low = [i for i, s in enumerate(pairs.scores) if s < 2.0]
    path = tmp_path_factory.mktemp("rows") / "triplets.tsv"
    path.write_text("anchor\tpositive\tnegative\n" + "".join(
        f"{pairs.first[i]}\t{pairs.second[i]}\t{pairs.second[low[k % len(low)]]}\n" for k, i in enumerate(high)))
    return path


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def evaluations(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "dev_spearman" in r]


# ---- the losses -------------------------------------------------------------------------------

def _sentence_transformers_loss(kind: str, model):
    from sentence_transformers.sentence_transformer import losses as st_losses

    if kind == "cosent":
        return st_losses.CoSENTLoss(model)
    if kind == "cosine":
        return st_losses.CosineSimilarityLoss(model)
    directions = ("query_to_doc", "doc_to_query") if kind == "mnrl-symmetric" else ("query_to_doc",)
    return st_losses.MultipleNegativesRankingLoss(model, directions=directions, partition_mode="per_direction")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cosent", "cosine", "mnrl", "mnrl-negatives", "mnrl-symmetric"])
def test_the_loss_and_its_gradients_are_sentence_transformers(tmp_path, kind, triplets):
    """One batch of 8 rows, the same MiniLM weights, dropout off: ctxvec's trainer computes the
    loss of sentence-transformers' class of the same name, and the same gradient for every weight."""
    from sentence_transformers import SentenceTransformer

    from ctxvec.weights.huggingface import bert_state_dict, minilm_dir

    loss = kind.split("-")[0]
    if loss == "mnrl":
        data = triplets
        if kind != "mnrl-negatives":  # anchor, positive only
            data = tmp_path / "pairs.tsv"
            data.write_text("".join("\t".join(line.split("\t")[:2]) + "\n"
                                    for line in triplets.read_text().splitlines()))
    else:
        data = TRAIN
    cfg = FinetuneConfig(loss=loss, batch_size=8, steps=1, dropout=0.0, symmetric=kind == "mnrl-symmetric")
    trainer = FinetuneTrainer(data, tmp_path / "run", cfg, model="minilm", progress=False)
    rows = trainer.batch_indices(0)
    [batch] = trainer.micro_batches(0)
    trainer.model.train()
    ours = trainer.loss_sum(trainer.model, batch) / cfg.batch_size
    ours.backward()

    st = SentenceTransformer(str(minilm_dir()), device="cpu").eval()
    columns = [[column[i] for i in rows] for column in trainer._text_columns(trainer.examples)]
    features = [st.tokenize(texts) for texts in columns]
    labels = trainer.labels[torch.from_numpy(rows)] if trainer.labels is not None else torch.zeros(len(rows))
    if loss == "cosine":
        labels = labels / cfg.max_score  # as `ctxvec finetune` scales them (STS: 0-5 -> 0-1)
    theirs = _sentence_transformers_loss(kind, st)(features, labels)
    theirs.backward()

    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    assert ours.item() > 0
    bert = st[0].auto_model
    grads = bert_state_dict({k: p.grad for k, p in bert.named_parameters() if p.grad is not None},
                            trainer.config)
    ours_grads = {k: p.grad for k, p in trainer.model.encoder.named_parameters()}
    assert grads.keys() == ours_grads.keys()
    scale = max(g.abs().max().item() for g in grads.values())
    worst = max((grads[k] - ours_grads[k]).abs().max().item() for k in grads)
    assert scale > 1e-6 and worst < 1e-5 * max(1.0, scale) and worst < 0.01 * scale, (worst, scale)


def test_cosent_counts_only_pairs_ranked_above_one_another():
    """Equal gold scores set no order; a batch whose cosines follow the gold order has a loss
    below log 2 and one in reverse order a far higher one."""
    a = torch.eye(3)
    b = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0, -1.0]])  # cosines 1, 0.8, -1
    in_order = cosent_loss(a, b, torch.tensor([5.0, 3.0, 0.0]))
    reversed_ = cosent_loss(a, b, torch.tensor([0.0, 3.0, 5.0]))
    all_equal = cosent_loss(a, b, torch.tensor([2.0, 2.0, 2.0]))
    assert in_order < np.log(2) < reversed_ and all_equal == 0.0
    assert reversed_ > 30  # ~ scale x the largest gap (20 x 2)


def test_mnrl_is_cross_entropy_over_in_batch_candidates():
    anchors = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    perfect = mnrl_loss(anchors, anchors.clone())
    shuffled = mnrl_loss(anchors, anchors.roll(1, 0))
    assert perfect < shuffled
    logits = 20 * anchors @ anchors.roll(1, 0).T
    assert torch.allclose(shuffled, torch.nn.functional.cross_entropy(logits, torch.arange(4)))


# ---- the run ----------------------------------------------------------------------------------

TINY = dict(batch_size=8, steps=6, eval_every=2, save_every=3, lr=1e-3, warmup=2, seed=3)


def test_exact_resume_equals_straight_run(tmp_path, tiny_model):
    """N steps straight == k steps + resume + N - k steps, bit for bit (CPU, fp32, dropout on)."""
    cfg = FinetuneConfig(**TINY)
    FinetuneTrainer(TRAIN, tmp_path / "straight", cfg, model=str(tiny_model), dev=DEV, progress=False).run()
    FinetuneTrainer(TRAIN, tmp_path / "resumed", FinetuneConfig(**{**TINY, "steps": 3}), model=str(tiny_model),
                    dev=DEV, progress=False).run()
    FinetuneTrainer(TRAIN, tmp_path / "resumed", cfg, model=str(tiny_model), dev=DEV, resume=True,
                    progress=False).run()
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert a == b and len(a) == 6
    assert len({round(v, 6) for v in a.values()}) > 1  # it trained
    for name in ("model.safetensors", "best.json"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    (_, ta, _), (_, tb, _) = (load_checkpoint(tmp_path / r) for r in ("straight", "resumed"))
    for part in ("model", "optimizer"):
        assert ta[part].keys() == tb[part].keys() and all(torch.equal(ta[part][k], tb[part][k]) for k in ta[part])


def test_the_run_keeps_the_best_dev_checkpoint_and_is_a_model(tmp_path, tiny_model):
    run = tmp_path / "run"
    cfg = FinetuneConfig(**{**TINY, "steps": 8, "lr": 5e-3})
    FinetuneTrainer(TRAIN, run, cfg, model=str(tiny_model), dev=DEV, progress=False).run()
    records = evaluations(run)
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
    best = max(records, key=lambda r: r["dev_spearman"])
    assert json.loads((run / "best.json").read_text()) == {"step": best["step"], "dev_spearman": best["dev_spearman"]}
    assert records[-1]["best_dev_spearman"] == best["dev_spearman"]
    loaded = ctxvec.load(run)  # the folder is a model: the best checkpoint's
    assert evaluate_pairs(loaded, DEV).spearman == pytest.approx(best["dev_spearman"], abs=1e-9)
    assert loaded.pooling.normalize and loaded.pooling.mode == "mean"


def test_without_dev_the_run_holds_the_latest_model(tmp_path, tiny_model):
    run = tmp_path / "run"
    trainer = FinetuneTrainer(TRAIN, run, FinetuneConfig(**TINY), model=str(tiny_model), progress=False)
    trainer.run()
    state = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in trainer.model.encoder.state_dict().items())
    assert not (run / "best.json").exists()


@pytest.mark.slow
def test_fine_tuning_minilm_with_cosent_fits_the_pairs_it_sees(tmp_path):
    """A few steps on the train sample raise the Spearman on those same pairs: the gradient points
    where the gold scores say (the dev figures are the benchmark's: benchmarks/finetune_sts.py)."""
    before = evaluate_pairs(ctxvec.load("minilm"), TRAIN).spearman
    cfg = FinetuneConfig(batch_size=16, epochs=2, lr=5e-5, warmup=1, eval_every=100, save_every=100)
    FinetuneTrainer(TRAIN, tmp_path / "run", cfg, model="minilm", progress=False).run()
    after = evaluate_pairs(ctxvec.load(tmp_path / "run"), TRAIN).spearman
    assert after > before + 1.0, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cosent", "mnrl"])
def test_two_gloo_processes_equal_one(tmp_path, tiny_model, triplets, loss):
    """torchrun with 2 processes (gloo) == 1 process with the same global batch: the loss spans
    both processes' rows (gathered with their gradients)."""
    data = str(triplets if loss == "mnrl" else TRAIN)
    common = [data, "--model", str(tiny_model), "--loss", loss, "--steps", "4", "--batch-size", "8",
              "--lr", "1e-3", "--warmup", "1", "--dropout", "0", "--eval-every", "4", "--save-every", "4",
              "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ctxvec", "finetune", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "ctxvec", "finetune", *common, "--nproc", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 4
    assert max(abs(a[k] - b[k]) for k in a) < 1e-5
    wa, wb = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("one", "two"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert meta["world"] == 2


def test_bf16_autocast_trains(tmp_path, tiny_model):
    cfg = FinetuneConfig(**{**TINY, "steps": 2, "precision": "bf16"})
    FinetuneTrainer(TRAIN, tmp_path / "run", cfg, model=str(tiny_model), dev=DEV, progress=False).run()
    assert all(np.isfinite(v) for v in losses(tmp_path / "run").values())
    assert ctxvec.load(tmp_path / "run").embed(["a test"]).dtype == np.float32


# ---- the command ------------------------------------------------------------------------------

def test_finetune_command_trains_and_says_where_the_model_is(tmp_path, tiny_model):
    run = tmp_path / "run"
    args = ["finetune", str(TRAIN), "--model", str(tiny_model), "--dev", str(DEV), "--out", str(run),
            "--steps", "2", "--batch-size", "8", "--eval-every", "1"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert f"model in {run}/" in out.output and "best_dev_spearman" in out.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "--resume" in again.output
    out = CliRunner().invoke(main, ["encode", "a test", "--model", str(run)])
    assert out.exit_code == 0, out.output


@pytest.mark.parametrize("args, content, message", [
    (["--loss", "cosent"], "a,b,1\nc,d\n", "line 2: expected 3 columns"),
    (["--loss", "mnrl"], "a\nb\n", "line 1: expected 2 or 3 columns"),
    (["--loss", "cosent", "--batch-size", "64"], "a,b,1\nc,d,2\n", "has 2 rows, fewer than one batch (64)"),
    (["--loss", "cosine", "--dev", "missing.csv"], "a,b,1\nc,d,2\n", "missing.csv: no such file"),
    (["--loss", "cosent", "--symmetric"], "a,b,1\nc,d,2\n", "symmetric is an option of the mnrl loss"),
])
def test_bad_data_is_one_line(tmp_path, tiny_model, args, content, message):
    data = tmp_path / "d.csv"
    data.write_text(content)
    out = CliRunner().invoke(main, ["finetune", str(data), "--model", str(tiny_model), "--out",
                                    str(tmp_path / "run"), "--batch-size", "2", *args])
    lines = out.output.strip().splitlines()
    assert out.exit_code == 1 and len(lines) == 1 and message in lines[0], out.output
