"""Masked-LM training: masking, exact resume, crash-safe checkpoints, many processes."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from click.testing import CliRunner

from ctxvec.weights.checkpoint import load_checkpoint
from ctxvec.cli import main
from ctxvec.model.config import EncoderConfig
from ctxvec.train.mlm_data import Masking, pack_sequences, read_documents, split_documents
from ctxvec.train.mlm import MaskedLanguageModel, round_up_positions
from ctxvec.loading import seed_tokenizer
from ctxvec.tokenizer import Tokenizer
from ctxvec.train import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the earth was formless and empty darkness was on the surface of the deep and god said let "
         "there be light and there was light god saw the light and saw that it was good").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) for _ in range(600)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    seed_tokenizer().save(path)
    return path


TINY = dict(steps=6, batch_tokens=8 * 32, seq_len=32, warmup=2, eval_every=3, save_every=3,
            eval_sequences=16, doc_lines=20)


def tiny_config_file(tmp_path: Path, dropout: float) -> str:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"d_model": 32, "n_heads": 4, "d_ff": 64, "n_layers": 2, "dropout": dropout}))
    return str(path)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


# ---- data and masking -----------------------------------------------------------------------

def test_documents_split_whole(corpus):
    docs = read_documents([corpus], doc_lines=20)
    assert len(docs) == 30 and all(len(d) == 20 for d in docs)
    train, held = split_documents(docs, 0.1, seed=0)
    assert len(held) == 3 and len(train) == 27
    assert not {tuple(d) for d in train} & {tuple(d) for d in held}


def test_blank_lines_separate_documents(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a b\nc d\n\ne f\n\n\ng h\n")
    assert read_documents([path]) == [["a b", "c d"], ["e f"], ["g h"]]


def test_sequences_are_full_length_with_special_tokens(corpus):
    tok = seed_tokenizer()
    seqs = pack_sequences(tok, read_documents([corpus], 20), 32)
    assert seqs.shape[1] == 32 and len(seqs) > 50
    assert (seqs[:, 0] == tok.token_to_id("[CLS]")).all() and (seqs[:, -1] == tok.token_to_id("[SEP]")).all()


def test_masking_rates_and_determinism(corpus):
    tok = seed_tokenizer()
    seqs = pack_sequences(tok, read_documents([corpus], 20), 32)
    masking = Masking.for_tokenizer(tok)
    idx = np.arange(len(seqs))
    inputs, labels, chosen = masking(seqs, idx, seed=0, step=5)
    assert np.array_equal(labels, seqs)
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # special tokens are never chosen
    rate = chosen.mean() * 32 / 30
    assert 0.12 < rate < 0.18
    masked = (inputs == masking.mask_id)[chosen].mean()
    kept = (inputs == seqs)[chosen].mean()
    assert 0.74 < masked < 0.86 and 0.06 < kept < 0.16
    assert (inputs[~chosen] == seqs[~chosen]).all()
    again = masking(seqs[::-1], idx[::-1], seed=0, step=5)[0][::-1]  # same masks in any grouping
    assert np.array_equal(again, inputs)
    assert not np.array_equal(masking(seqs, idx, seed=0, step=6)[0], inputs)


# ---- training --------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_the_run_is_a_model(tmp_path, corpus, tokenizer_file):
    import ctxvec

    cfg = TrainConfig(**{**TINY, "steps": 30, "lr": 3e-3, "eval_every": 30, "save_every": 30})
    trainer = Trainer([corpus], tmp_path / "run", cfg, preset=tiny_config_file(tmp_path, 0.0),
                      tokenizer=str(tokenizer_file), progress=False)
    result = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0] - 1.0
    assert result["eval_perplexity"] == pytest.approx(np.exp(result["eval_loss"]))
    # held-out accuracy: the share of chosen positions whose top score is the right token
    idx = np.arange(len(trainer.eval_seqs))
    arrays = trainer.masking(trainer.eval_seqs, idx, cfg.seed, 2**31)  # evaluate()'s fixed masks
    inputs, labels, chosen = (torch.from_numpy(a) for a in arrays)
    with torch.no_grad():
        logits = trainer.model.eval()(inputs, labels, chosen).logits
    right = (logits.argmax(-1) == labels[chosen]).double().mean().item()
    assert result["eval_accuracy"] == pytest.approx(right) and 0 < right < 1
    pipeline = ctxvec.load(tmp_path / "run")
    assert pipeline.encode(["the earth was good"])[0].vectors.shape == (6, 32)


@pytest.mark.slow
def test_exact_resume_equals_straight_run(tmp_path, corpus, tokenizer_file):
    """N steps straight == k steps + resume + N - k steps, bit for bit (CPU, fp32, dropout on)."""
    config = tiny_config_file(tmp_path, dropout=0.1)
    cfg = TrainConfig(**TINY)
    Trainer([corpus], tmp_path / "straight", cfg, preset=config, tokenizer=str(tokenizer_file), progress=False).run()
    Trainer([corpus], tmp_path / "resumed", TrainConfig(**{**TINY, "steps": 3}), preset=config,
            tokenizer=str(tokenizer_file), progress=False).run()
    Trainer([corpus], tmp_path / "resumed", cfg, preset=config, tokenizer=str(tokenizer_file),
            resume=True, progress=False).run()
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert a == b and len(a) == 6
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    _, ta, _ = load_checkpoint(tmp_path / "straight")
    _, tb, _ = load_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(ta["optimizer"][k], tb["optimizer"][k]) for k in ta["optimizer"])


def test_an_existing_run_needs_resume(tmp_path, corpus, tokenizer_file):
    cfg = TrainConfig(**{**TINY, "steps": 3})
    config = tiny_config_file(tmp_path, 0.0)
    Trainer([corpus], tmp_path / "run", cfg, preset=config, tokenizer=str(tokenizer_file), progress=False).run()
    with pytest.raises(ValueError, match="--resume"):
        Trainer([corpus], tmp_path / "run", cfg, preset=config, tokenizer=str(tokenizer_file), progress=False)


def test_two_runs_with_the_same_seed_are_identical_with_a_tokenizer_trained_each_time(tmp_path, corpus):
    """Before: the WordPiece trainer gave a different vocabulary each run, so ``--seed`` did not
    make ``ctxvec train`` reproducible without ``--tokenizer``."""
    cfg = TrainConfig(**{**TINY, "steps": 3, "vocab_size": 300})
    for name in ("a", "b"):
        Trainer([corpus], tmp_path / name, cfg, preset=tiny_config_file(tmp_path, 0.1), progress=False).run()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def _train_cli(corpus: Path, run: Path, config: str, *extra: str):
    args = ["train", str(corpus), "--out", str(run), "--config", config, "--batch-tokens", "256", "--seq-len", "32",
            "--warmup", "1", "--eval-every", "2", "--save-every", "2", "--vocab-size", "200", *extra]
    return CliRunner().invoke(main, args)


def test_what_a_resume_finds_is_said(tmp_path, corpus):
    """Before: a --resume without a checkpoint started fresh in silence, and a resume of a
    finished run printed "trained to step 2: ;"."""
    config = tiny_config_file(tmp_path, 0.0)
    run = tmp_path / "run"
    result = _train_cli(corpus, run, config, "--steps", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert f"--resume: {run} holds no checkpoint yet, so this is a new run" in result.output
    assert "trained to step 2: held-out loss" in result.output
    result = _train_cli(corpus, run, config, "--steps", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert f"the run in {run}/ is already at step 2 (--steps 2); nothing was done" in result.output
    assert "trained to" not in result.output


def test_a_tokenizer_already_in_the_run_folder_is_named(tmp_path, corpus, tokenizer_file):
    """Before: ``train --out DIR`` reused DIR/tokenizer.json without a word, even against --tokenizer."""
    config = tiny_config_file(tmp_path, 0.0)
    run = tmp_path / "run"
    run.mkdir()
    Tokenizer.train([corpus], vocab_size=80).save(run / "tokenizer.json")
    result = _train_cli(corpus, run, config, "--steps", "1")
    assert result.exit_code == 0, result.output
    assert f"using the tokenizer already in {run / 'tokenizer.json'} (80 tokens)" in result.output
    other = tmp_path / "other"
    result = _train_cli(corpus, other, config, "--steps", "1", "--tokenizer", str(tokenizer_file))
    assert f"tokenizer: {tokenizer_file}, copied to {other / 'tokenizer.json'}" in result.output
    result = _train_cli(corpus, run, config, "--steps", "2", "--resume", "--tokenizer", str(tokenizer_file))
    assert result.exit_code == 1
    assert f"{run / 'tokenizer.json'} already exists and differs from --tokenizer {tokenizer_file}" in result.output


def test_a_second_training_on_the_same_run_folder_is_refused(tmp_path, corpus):
    from ctxvec.train import lock_run

    run = tmp_path / "run"
    run.mkdir()
    with lock_run(run):
        result = _train_cli(corpus, run, tiny_config_file(tmp_path, 0.0), "--steps", "1")
    assert result.exit_code == 1
    assert f"another job (process {os.getpid()}) is writing {run}; wait for it to finish, or choose another --out" \
        in result.output


def test_a_run_in_the_current_folder_and_its_files_follow_the_umask(tmp_path, corpus):
    """Before: safetensors files came out 0600 whatever the umask (the library renames a private
    temporary file of its own onto the target), and a lock beside ``--out .`` had no name."""
    run = tmp_path / "run"
    run.mkdir()
    args = [sys.executable, "-m", "ctxvec", "train", str(corpus), "--out", ".", "--config",
            tiny_config_file(tmp_path, 0.0), "--steps", "2", "--batch-tokens", "256", "--seq-len", "32",
            "--warmup", "1", "--eval-every", "2", "--save-every", "2", "--vocab-size", "200", "--threads", "1"]
    proc = subprocess.run(args, cwd=run, capture_output=True, text=True, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                       "tokenizer.json", "ctxvec.json", "metrics.jsonl", "latest.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    assert all(p.stat().st_mode & 0o777 == 0o755 for p in run.rglob("*") if p.is_dir())


def test_plot_skips_a_line_torn_by_a_crash_and_names_a_bad_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    good = "".join(json.dumps({"step": s, "loss": 4.0 / s}) + "\n" for s in range(1, 5))
    (run / "metrics.jsonl").write_text('{"event": "start"}\n' + good + '{"step": 5, "lo')
    result = CliRunner().invoke(main, ["plot", str(run)])
    assert result.exit_code == 0 and (run / "loss.png").is_file()
    (run / "metrics.jsonl").write_text(good + "not json\n" + good)
    result = CliRunner().invoke(main, ["plot", str(run)])
    assert result.exit_code == 1 and f"{run / 'metrics.jsonl'}, line 5: not JSON." in result.output


CHILD = textwrap.dedent("""
    import sys, time
    import ctxvec.weights.checkpoint as ck
    from ctxvec.train import Trainer, TrainConfig
    real = ck.fsync_file
    saves = []
    def slow(path):
        real(path)
        if "step-00000004" in str(path):
            print("SAVING", flush=True)
            time.sleep(60)
    ck.fsync_file = slow
    cfg = TrainConfig(steps=6, batch_tokens=256, seq_len=32, warmup=2, eval_every=100, save_every=2,
                      eval_sequences=16, doc_lines=20)
    Trainer([sys.argv[1]], sys.argv[2], cfg, preset=sys.argv[3], tokenizer=sys.argv[4], progress=False).run()
""")


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path, corpus, tokenizer_file):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(corpus), str(run),
                             tiny_config_file(tmp_path, 0.1), str(tokenizer_file)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "SAVING"  # in the middle of writing step 4
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    step, tensors, meta = load_checkpoint(run)
    assert step == 2 and meta["step"] == 2
    assert set(tensors) == {"model", "optimizer", "rng"}
    # and training resumes from it
    cfg = TrainConfig(steps=4, batch_tokens=256, seq_len=32, warmup=2, eval_every=100, save_every=2,
                      eval_sequences=16, doc_lines=20)
    trainer = Trainer([corpus], run, cfg, preset=tiny_config_file(tmp_path, 0.1),
                      tokenizer=str(tokenizer_file), resume=True, progress=False)
    assert trainer.step == 2
    trainer.run()
    assert load_checkpoint(run)[0] == 4


@pytest.mark.parametrize("error", [(errno.ENOSPC, "No space left on device"),
                                   (errno.EROFS, "Read-only file system")], ids=["disk-full", "read-only"])
def test_a_failed_write_raises_and_keeps_the_previous_checkpoint(tmp_path, corpus, tokenizer_file, monkeypatch,
                                                                  error):
    import ctxvec.weights.tensorfile as ck

    run = tmp_path / "run"
    config = tiny_config_file(tmp_path, 0.0)
    cfg = TrainConfig(**{**TINY, "steps": 3})
    Trainer([corpus], run, cfg, preset=config, tokenizer=str(tokenizer_file), progress=False).run()
    real = ck.save_file

    def disk_full(tensors, path, metadata=None):
        if "optimizer" in str(path):
            raise OSError(*error)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", disk_full)
    trainer = Trainer([corpus], run, TrainConfig(**{**TINY, "steps": 6}), preset=config,
                      tokenizer=str(tokenizer_file), resume=True, progress=False)
    with pytest.raises(OSError, match=rf"cannot write the checkpoint {run}/checkpoints/step-00000006: "
                                      rf"{error[1].lower().replace('device', 'the device')}"):
        trainer.run()
    assert load_checkpoint(run)[0] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]  # no debris


def test_nan_stops_training_before_the_weights_or_checkpoints_change(tmp_path, corpus, tokenizer_file):
    from ctxvec.model.encoder import NonFiniteError

    run = tmp_path / "run"
    config = tiny_config_file(tmp_path, 0.0)
    Trainer([corpus], run, TrainConfig(**{**TINY, "steps": 2}), preset=config, tokenizer=str(tokenizer_file),
            progress=False).run()
    saved = load_file(str(run / "checkpoints" / "step-00000002" / "model.safetensors"))
    trainer = Trainer([corpus], run, TrainConfig(**{**TINY, "steps": 4}), preset=config,
                      tokenizer=str(tokenizer_file), resume=True, progress=False)
    with torch.no_grad():
        trainer.model.head.dense.weight[0, 0] = float("nan")  # NaN reaches only the loss
    with pytest.raises(NonFiniteError, match="step 3: the loss is nan"):
        trainer.run()
    assert load_checkpoint(run)[0] == 2
    after = load_file(str(run / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert all(torch.equal(saved[k], after[k]) for k in saved)


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path, corpus, tokenizer_file):
    """torchrun with 2 processes (gloo) == 1 process with the same global batch, within 1e-6."""
    config = tiny_config_file(tmp_path, dropout=0.0)
    common = [str(corpus), "--config", config, "--tokenizer", str(tokenizer_file), "--steps", "5",
              "--batch-tokens", "256", "--seq-len", "32", "--warmup", "2", "--eval-every", "5",
              "--save-every", "5", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ctxvec", "train", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "ctxvec", "train", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 5
    assert max(abs(a[k] - b[k]) for k in a) < 1e-6
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert meta["world"] == 2


def test_ranks_see_disjoint_data(tmp_path, corpus, tokenizer_file):
    trainer = Trainer([corpus], tmp_path / "run", TrainConfig(**TINY), preset=tiny_config_file(tmp_path, 0.0),
                      tokenizer=str(tokenizer_file), progress=False)
    idx = trainer.batch_indices(0)
    assert len(set(idx.tolist())) == len(idx)
    world = 2
    shards = [set(idx.reshape(1, world, -1)[:, r].ravel().tolist()) for r in range(world)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(idx.tolist())
    per_epoch = len(trainer.train_seqs) // trainer.per_step
    assert not np.array_equal(trainer.batch_indices(0), trainer.batch_indices(per_epoch))  # reshuffled


def test_plot(tmp_path, corpus, tokenizer_file):
    from click.testing import CliRunner

    from ctxvec.cli import main

    Trainer([corpus], tmp_path / "run", TrainConfig(**TINY), preset=tiny_config_file(tmp_path, 0.0),
            tokenizer=str(tokenizer_file), progress=False).run()
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize("norm_first", [False, True])
def test_masked_lm_loss_is_the_full_encoder_read_at_the_chosen_positions(norm_first):
    """The last layer computes the chosen positions only; the loss is the same as computing all."""
    config = EncoderConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0,
                           max_len=16, norm_first=norm_first, final_norm=norm_first)
    model = MaskedLanguageModel(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (3, 12), generator=g)
    labels = torch.randint(5, 50, (3, 12), generator=g)
    chosen = torch.rand(3, 12, generator=g) < 0.2
    chosen[0, 1] = True
    out = model(ids, labels, chosen)
    hidden = model.encoder(ids).last_hidden_state[chosen]  # every position, then read
    logits = model.head(hidden, model.encoder.embeddings.tokens.weight)
    expected = torch.nn.functional.cross_entropy(logits, labels[chosen], reduction="sum")
    assert out.n_predicted == int(chosen.sum()) and out.logits.shape == (out.n_predicted, 50)
    assert abs(out.loss_sum.item() - expected.item()) < 1e-4 * expected.item()
    assert torch.allclose(out.logits, logits, atol=1e-5)


def test_chosen_positions_are_rounded_up_with_unchosen_real_tokens():
    """The last layer and the head see a bucketed row count (oneDNN keeps a kernel per shape);
    the extra rows are real tokens that were not chosen, and the loss ignores them."""
    g = torch.Generator().manual_seed(0)
    chosen = torch.rand(4, 50, generator=g) < 0.15
    real = torch.ones(4, 50, dtype=torch.bool)
    real[3, 20:] = False
    chosen &= real
    positions = round_up_positions(chosen, real, 16)
    assert int(positions.sum()) % 16 == 0 and int(positions.sum()) - int(chosen.sum()) < 16
    assert torch.all(positions[chosen]) and not torch.any(positions & ~real)
    few = torch.zeros(1, 5, dtype=torch.bool)
    few[0, 2] = True
    assert torch.equal(round_up_positions(few, torch.ones_like(few), 16), torch.ones_like(few))  # all there is


def test_masked_lm_training_follows_bert_for_masked_lm_on_the_same_weights():
    """Same weights, same batches, dropout 0: ctxvec's masked-LM losses and weights follow Hugging
    Face BertForMaskedLM's step for step (what the throughput benchmark's speed is measured on)."""
    from transformers import BertConfig, BertForMaskedLM

    from ctxvec.weights.huggingface import bert_config, bert_state_dict

    hf_config = BertConfig(vocab_size=60, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           num_hidden_layers=2, hidden_act="gelu", max_position_embeddings=16,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
    torch.manual_seed(3)
    hf = BertForMaskedLM(hf_config).train()
    hf_state = hf.state_dict()
    config = bert_config({**hf_config.to_dict(), "model_type": "bert"})
    ours = MaskedLanguageModel(config).train()
    encoder = {k: v for k, v in hf_state.items() if k.startswith("bert.")}
    state = {f"encoder.{k}": v for k, v in bert_state_dict(encoder, config).items()}
    state.update({"head.dense.weight": hf_state["cls.predictions.transform.dense.weight"],
                  "head.dense.bias": hf_state["cls.predictions.transform.dense.bias"],
                  "head.norm.weight": hf_state["cls.predictions.transform.LayerNorm.weight"],
                  "head.norm.bias": hf_state["cls.predictions.transform.LayerNorm.bias"],
                  "head.bias": hf_state["cls.predictions.bias"]})
    ours.load_state_dict(state, strict=True)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (ours, hf)]
    g = torch.Generator().manual_seed(4)
    for step in range(4):
        ids = torch.randint(1, 60, (3, 12), generator=g)  # 0 is the padding id: no padding here
        labels = torch.randint(1, 60, (3, 12), generator=g)
        chosen = torch.rand(3, 12, generator=g) < 0.25
        chosen[:, 0] = True
        out = ours(ids, labels, chosen)
        loss_ours = out.loss_sum / out.n_predicted
        loss_hf = hf(input_ids=ids, labels=torch.where(chosen, labels, -100)).loss
        assert abs(loss_ours.item() - loss_hf.item()) < 1e-5, step
        for loss, opt in zip((loss_ours, loss_hf), optimizers):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    ours_now = ours.encoder.embeddings.tokens.weight
    hf_now = hf.bert.embeddings.word_embeddings.weight
    assert not torch.equal(ours_now, state["encoder.embeddings.tokens.weight"])  # it did train
    assert (ours_now - hf_now).abs().max().item() < 1e-5


def test_bf16_training_evaluates_under_autocast(tmp_path, corpus, tokenizer_file):
    """Before: the held-out evaluation (no gradients, bf16 autocast) crashed in the oneDNN linear."""
    cfg = TrainConfig(**{**TINY, "steps": 2, "eval_every": 2, "save_every": 2, "precision": "bf16"})
    result = Trainer([corpus], tmp_path / "run", cfg, preset=tiny_config_file(tmp_path, 0.0),
                     tokenizer=str(tokenizer_file), progress=False).run()
    assert np.isfinite(result["eval_loss"])
