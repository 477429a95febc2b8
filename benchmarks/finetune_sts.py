"""Sentence quality on the STS benchmark: fine-tuning MiniLM against sentence-transformers' own
trainer, and an encoder of the seed's kind learned from nothing.

    .venv/bin/pip install datasets accelerate        # sentence-transformers' trainer needs them
    .venv/bin/python benchmarks/finetune_sts.py --part sts [--epochs 1] [--threads 2]
    .venv/bin/python benchmarks/finetune_sts.py --part scratch [--minutes 75] [--threads 2]

``--part sts`` (target 1): all-MiniLM-L6-v2 fine-tuned with CoSENT on ../shared/data/stsb_en_train.csv
by ``ctxvec finetune``'s trainer and by sentence-transformers' ``SentenceTransformerTrainer`` (what
its ``fit`` runs) with the same loss, batch size, learning rate, warm-up, epochs, seed, weight
decay, clipping and schedule, in fp32 and in bf16 autocast, one after the other on the same
threads. Reports the dev Spearman (the base model's beside it) and the training throughput
(pairs/s over the optimizer steps alone, evaluations left out).

``--part scratch`` (target 2): ``ctxvec train`` pretrains a 4 x 256 seed-style encoder (post-norm,
ReLU, sinusoidal, 64-wide heads) by masked-LM on web_en.txt plus the unlabelled sentences of the
STS train split, for --minutes; then CoSENT fine-tuning on the STS train pairs; dev Spearman
before and after, against the SBERT paper's baselines.

Writes benchmarks/results/finetune_{sts,scratch}.{json,md} and updates BENCHMARKS.md. The test
split is not used anywhere (choose on dev; its figure is measured independently).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_WEB, machine, write_results  # noqa: E402

import ctxvec  # noqa: E402
from ctxvec.evaluation import evaluate_pairs  # noqa: E402
from ctxvec.pairs import read_scored_pairs  # noqa: E402
from ctxvec.train.finetune import FinetuneConfig, FinetuneTrainer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TRAIN, DEV = DATA / "stsb_en_train.csv", DATA / "stsb_en_dev.csv"
OUT = ROOT / "benchmarks" / "results"
SBERT_BASELINES = {"average GloVe": 58.02, "average BERT": 46.35, "BERT CLS": 16.50}  # STS-B test, SBERT paper


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_seconds(run: Path) -> tuple[float, int]:
    """(seconds spent in optimizer steps, steps) from a run's metrics (evaluations left out)."""
    steps = [r for r in records(run) if "loss" in r and "tokens_per_s" in r]
    return sum(r["tokens"] / r["tokens_per_s"] for r in steps), len(steps)


def ctxvec_finetune(model: str, precision: str, args, run: Path, warmup: int, eval_every: int, seed: int = 0) -> dict:
    if run.exists():
        shutil.rmtree(run)
    cfg = FinetuneConfig(loss="cosent", batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, warmup=warmup,
                         weight_decay=0.0, eval_every=eval_every, save_every=10**6, seed=seed, precision=precision)
    trainer = FinetuneTrainer(TRAIN, run, cfg, model=model, dev=DEV, progress=True)
    start = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - start
    seconds, steps = train_seconds(run)
    curve = [(r["step"], r["dev_spearman"]) for r in records(run) if "dev_spearman" in r]
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return {"system": "ctxvec", "precision": precision, "seed": seed, "steps": steps, "train_seconds": seconds,
            "wall_seconds": wall, "pairs_per_s": steps * args.batch_size / seconds,
            "dev_spearman_last": curve[-1][1], "dev_spearman_best": max(s for _, s in curve), "curve": curve}


def st_finetune(precision: str, args, warmup: int, seed: int = 0) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    from ctxvec.weights.huggingface import minilm_dir

    train, dev = read_scored_pairs(TRAIN), read_scored_pairs(DEV)
    torch.manual_seed(seed)
    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    dataset = Dataset.from_dict({"sentence1": train.first, "sentence2": train.second,
                                 "score": train.scores.astype("float32").tolist()})
    out = OUT / "st_run"
    training = SentenceTransformerTrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=warmup, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="linear",
        seed=seed, bf16=precision == "bf16", use_cpu=True, save_strategy="no", report_to=[], logging_steps=10**6,
        dataloader_drop_last=True, disable_tqdm=False)
    trainer = SentenceTransformerTrainer(model=model, args=training, train_dataset=dataset,
                                         loss=losses.CoSENTLoss(model))
    result = trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    evaluator = EmbeddingSimilarityEvaluator(dev.first, dev.second, dev.scores.tolist(), name="dev")
    spearman = 100 * evaluator(model)["dev_spearman_cosine"]
    steps = result.global_step
    seconds = result.metrics["train_runtime"]
    return {"system": "sentence-transformers", "precision": precision, "seed": seed, "steps": steps, "train_seconds": seconds,
            "pairs_per_s": steps * args.batch_size / seconds, "dev_spearman_last": spearman}


def part_sts(args, facts) -> None:
    """Each system and precision once per seed (fp32: every --seeds; bf16: the first), alternating."""
    per_epoch = len(read_scored_pairs(TRAIN)) // args.batch_size
    steps = per_epoch * args.epochs
    warmup = round(0.1 * steps)
    base = evaluate_pairs(ctxvec.load("minilm"), DEV)
    runs = []
    for precision in args.precisions:
        for seed in args.seeds if precision == "fp32" else args.seeds[:1]:
            runs.append(ctxvec_finetune("minilm", precision, args, OUT / f"sts_{precision}", warmup,
                                        eval_every=max(1, steps // 6), seed=seed))
            runs.append(st_finetune(precision, args, warmup, seed))
    result = {"machine": facts, "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "warmup": warmup, "steps": steps,
              "base_dev_spearman": base.spearman, "runs": runs}
    write_results("finetune_sts", result, sts_markdown(result), OUT, update=True)


def sts_markdown(result: dict) -> str:
    facts, runs, base = result["machine"], result["runs"], result["base_dev_spearman"]
    precisions = list(dict.fromkeys(r["precision"] for r in runs))
    units = facts.get("matrix_units") or ", ".join(facts["simd"])
    res = result
    lines = [f"**Fine-tuning all-MiniLM-L6-v2 on STS-B train with CoSENT** ({facts['cpu']} "
             f"({units}; native bf16: {'yes' if facts['native_bf16'] else 'no'}), {res['threads']} threads, torch "
             f"{facts['torch']}; {res['date']}): {res['epochs']} epoch(s) of {res['steps'] // res['epochs']} steps, "
             f"batch {res['batch_size']}, lr {res['lr']:g}, {res['warmup']} warm-up steps then linear "
             "decay, weight decay 0, clipping 1.0, the last partial batch dropped, for both; sentence-transformers "
             "through its `SentenceTransformerTrainer` (what `fit` runs). Dev Spearman x100 (cosine vs gold) on "
             f"`stsb_en_dev.csv` (1,500 pairs) at the end of training; base model: **{base:.2f}**. "
             "Throughput: pairs per second of the optimizer steps alone (evaluations left out).", "",
             "| precision | seeds | system | dev Spearman (end), mean [each seed] | pairs/s (mean) | ctxvec / s-t |",
             "|---|---|---|---:|---:|---:|"]
    for precision in precisions:
        group = {name: [r for r in runs if r["precision"] == precision and r["system"] == name]
                 for name in ("ctxvec", "sentence-transformers")}
        speed = {name: statistics.mean(r["pairs_per_s"] for r in rs) for name, rs in group.items()}
        for name, label in (("ctxvec", "ctxvec finetune"), ("sentence-transformers", "sentence-transformers")):
            figures = [r["dev_spearman_last"] for r in group[name]]
            ratio = f"**{speed['ctxvec'] / speed['sentence-transformers']:.2f}x**" if name == "ctxvec" else ""
            lines.append(f"| {precision} | {', '.join(str(r['seed']) for r in group[name])} | {label} | "
                         f"{statistics.mean(figures):.2f} [{', '.join(f'{f:.2f}' for f in figures)}] | "
                         f"{speed[name]:.1f} | {ratio} |")
    fp32 = [r for r in runs if r["precision"] == "fp32" and r["system"] == "ctxvec"]
    if fp32:
        lines += ["", "ctxvec fp32 dev Spearman during training, seed by seed (step: Spearman); `ctxvec finetune "
                  "--dev` keeps the best as the run's model:"]
        lines += [f"- seed {r['seed']}: " + ", ".join(f"{s}: {v:.2f}" for s, v in r["curve"]) for r in fp32]
    return "\n".join(lines) + "\n"


def part_scratch(args, facts) -> None:
    run = OUT / "scratch_mlm"
    corpus = OUT / "stsb_train_sentences.txt"
    train = read_scored_pairs(TRAIN)
    corpus.write_text("\n".join(dict.fromkeys(train.first + train.second)) + "\n")
    if run.exists():
        shutil.rmtree(run)
    precision = "bf16" if facts["native_bf16"] else "fp32"
    start = time.perf_counter()
    # the wall-clock budget: steps at the measured pace, decayed to 0 at the end (ctxvec train's schedule)
    pace = subprocess.run([sys.executable, "-m", "ctxvec", "train", str(SHARED_WEB), str(corpus), "--out",
                           str(run), "--config", "small", "--steps", "20", "--eval-every", "20", "--save-every",
                           "1000", "--precision", precision, "--threads", str(args.threads)],
                          capture_output=True, text=True)
    assert pace.returncode == 0, pace.stderr
    rates = [r["tokens_per_s"] for r in records(run) if "tokens_per_s" in r][5:]
    shutil.rmtree(run)
    steps = int(args.minutes * 60 * sorted(rates)[len(rates) // 2] / 4096 * 0.93)
    cmd = [sys.executable, "-m", "ctxvec", "train", str(SHARED_WEB), str(corpus), "--out", str(run),
           "--config", "small", "--steps", str(steps), "--lr", "1e-3", "--warmup", "200", "--eval-every", "250",
           "--save-every", "250", "--precision", precision, "--threads", str(args.threads)]
    subprocess.run(cmd, check=True)
    pretrain_minutes = (time.perf_counter() - start) / 60
    mlm = [r for r in records(run) if "eval_loss" in r]
    before = evaluate_pairs(ctxvec.load(run), DEV).spearman
    per_epoch = len(train) // args.batch_size
    sweep = {}
    for lr in args.scratch_lrs:  # the learning rate is chosen on dev, as everything else
        sweep[lr] = ctxvec_finetune(str(run), "fp32", argparse.Namespace(**{**vars(args), "lr": lr,
                                                                           "epochs": args.scratch_epochs}),
                                    OUT / f"scratch_sts_{lr:g}", warmup=round(0.1 * per_epoch * args.scratch_epochs),
                                    eval_every=max(1, per_epoch // 2))
    lr = max(sweep, key=lambda k: sweep[k]["dev_spearman_best"])
    tuned = sweep[lr]
    total = (time.perf_counter() - start) / 60
    sha = bundle(OUT / f"scratch_sts_{lr:g}", facts, cmd, steps, pretrain_minutes, before, tuned, lr, args)
    result = {"machine": facts, "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
              "pretrain": {"command": " ".join(cmd[2:]), "minutes": pretrain_minutes, "steps": steps,
                           "eval_first": mlm[0], "eval_last": mlm[-1], "precision": precision},
              "dev_spearman_pretrained": before, "finetune": tuned, "finetune_lr": lr,
              "sweep": {f"{k:g}": v["dev_spearman_best"] for k, v in sweep.items()}, "total_minutes": total,
              "baselines_test": SBERT_BASELINES, "bundled_sha256": sha}
    lines = [f"**From nothing** ({facts['cpu']} ({', '.join(facts['simd'])}), {args.threads} threads, torch "
             f"{facts['torch']}; {result['date']}): a 4 x 256 seed-style encoder (post-norm, ReLU, sinusoidal, "
             f"4 heads of 64; WordPiece 8,000) pretrained by masked-LM ({precision} autocast) for "
             f"{pretrain_minutes:.0f} minutes ({steps} steps of 4,096 tokens) on `web_en.txt` plus the unlabelled "
             "sentences of the STS-B train split, then fine-tuned with CoSENT on the STS-B train pairs "
             f"({args.scratch_epochs} epochs, batch {args.batch_size}, lr {lr:g} chosen on dev among "
             f"{', '.join(f'{k:g}' for k in sweep)}: best dev {', '.join(f'{v:.2f}' for v in result['sweep'].values())}); "
             f"{total:.0f} minutes in all. Bundled as `--model seed-trained` (bf16, sha256 {sha[:12]}...).",
             "", "| model | STS-B dev Spearman x100 |", "|---|---:|",
             f"| masked-LM only (mean pooling) | {before:.2f} |",
             f"| + CoSENT fine-tuning (best on dev) | **{tuned['dev_spearman_best']:.2f}** |", "",
             "SBERT paper baselines on STS-B **test** (not comparable split for split; the test figure of this "
             "model is measured independently): " + ", ".join(f"{k} {v:.2f}" for k, v in SBERT_BASELINES.items()),
             "", f"Held-out masked-LM loss {mlm[0]['eval_loss']:.2f} -> {mlm[-1]['eval_loss']:.2f}; dev Spearman "
             "during fine-tuning (step: Spearman): " + ", ".join(f"{s}: {v:.2f}" for s, v in tuned["curve"])]
    write_results("finetune_scratch", result, "\n".join(lines) + "\n", OUT, update=True)


def bundle(run: Path, facts: dict, cmd: list[str], steps: int, minutes: float, before: float, tuned: dict,
           lr: float, args) -> str:
    """The fine-tuned run (its best dev checkpoint) as the bundled ``seed-trained`` model: bf16
    weights, tokenizer, ctxvec.json and a model card. Returns the weights' sha256."""
    from ctxvec.loading import save_pipeline
    from ctxvec.weights.tensorfile import sha256_of

    target = ROOT / "src" / "ctxvec" / "assets" / "seed_trained"
    pipeline = ctxvec.load(run)
    pipeline.encoder.to(torch.bfloat16)
    save_pipeline(pipeline, target, "seed-trained: a 4 x 256 encoder of the seed's kind learned from nothing by "
                                    "ctxvec (masked-LM, then CoSENT on STS-B train)")
    sha = sha256_of(target / "model.safetensors")
    config = pipeline.encoder.config
    card = f"""# seed-trained

An encoder of the seed's kind, learned from nothing by ctxvec on 2 CPU cores: what
`ctxvec explain --model seed-trained` shows a learner (a trained encoder's attention, where
`--model seed` shows random weights).

- Architecture: {config.n_layers} layers x {config.d_model}, {config.n_heads} heads of
  {config.d_model // config.n_heads}, feed-forward {config.d_ff}, ReLU, post-norm (Add & Norm after each
  sub-layer), sinusoidal positions, embeddings scaled by sqrt(d); mean pooling; WordPiece
  {config.vocab_size:,} (lower-cased), {pipeline.max_len}-token limit. Weights in bf16
  (`model.safetensors`, sha256 `{sha}`, verified on every load).
- Step 1, masked-LM pretraining ({minutes:.0f} minutes, {steps} steps of 4,096 tokens, {facts['cpu']}
  ({', '.join(facts['simd'])}), {args.threads} threads):
  `ctxvec {' '.join(cmd[3:])}` where the corpus is `web_en.txt` (the World English Bible, public
  domain) and the {len(set(read_scored_pairs(TRAIN).first + read_scored_pairs(TRAIN).second)):,} distinct sentences of the STS benchmark's
  train split without their scores (`stsb_train_sentences.txt`).
- Step 2, contrastive fine-tuning on the STS-B train pairs with CoSENT
  (`ctxvec finetune stsb_en_train.csv --model RUN --dev stsb_en_dev.csv --loss cosent --epochs
  {args.scratch_epochs} --batch-size {args.batch_size} --lr {lr:g}`), the checkpoint with the best dev Spearman kept.
- STS-B dev Spearman x100: {before:.2f} after step 1, **{tuned['dev_spearman_best']:.2f}** after step 2.
  The SBERT paper's baselines on the test split: average GloVe 58.02, average BERT 46.35,
  BERT CLS 16.50 (this model's test figure is measured independently; the test split was
  never used).
- Made by `benchmarks/finetune_sts.py --part scratch` ({time.strftime('%Y-%m-%d')}). Licence: the
  Bible text is public domain; the STS-B scores are CC BY-SA 4.0 (Cer et al., SemEval-2017).
"""
    (target / "README.md").write_text(card)
    print(f"bundled {target} (sha256 {sha}): set SEED_TRAINED_SHA256 in src/ctxvec/loading.py")
    return sha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["sts", "scratch"], required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--part sts: fp32 runs per system")
    parser.add_argument("--minutes", type=float, default=75.0, help="--part scratch: pretraining budget")
    parser.add_argument("--scratch-lrs", type=float, nargs="+", default=[5e-5, 2e-4],
                        help="--part scratch: fine-tuning learning rates to choose from on dev")
    parser.add_argument("--scratch-epochs", type=int, default=4, help="--part scratch: fine-tuning epochs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (TRAIN.is_file() and DEV.is_file()):
        raise SystemExit(f"needs {TRAIN} and {DEV} (see ../shared/data/README.md)")
    torch.set_num_threads(args.threads)
    facts = machine()
    part_sts(args, facts) if args.part == "sts" else part_scratch(args, facts)


if __name__ == "__main__":
    main()
