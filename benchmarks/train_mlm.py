"""Masked-LM pretraining on real text, for a fixed wall-clock budget, and training throughput
side by side with Hugging Face BertForMaskedLM at the seed's dimensions.

    .venv/bin/python benchmarks/train_mlm.py [--minutes 10] [--throughput-steps 8]

1. Splits ../shared/data/web_en.txt into documents of 100 verses (about a chapter) and holds
   5% of them out; trains a WordPiece tokenizer (8,000) on the rest.
2. Trains a small seed-style encoder (4 layers x 256, post-norm, ReLU, sinusoidal) with
   `ctxvec train` for --minutes; reports held-out masked-LM loss / perplexity before and after,
   the loss curve (PNG) and masked-word predictions on held-out sentences.
3. Times one training step (AdamW, batch 16 x 128) of ctxvec's MaskedLanguageModel and of
   BertForMaskedLM with the seed's dims and the same vocabulary, alternating, fp32 and bf16.
Writes benchmarks/results/train_mlm.{json,md} and updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_WEB, machine, write_results  # noqa: E402

from ctxvec.model.config import EncoderConfig  # noqa: E402
from ctxvec.train.mlm_data import Masking  # noqa: E402
from ctxvec.train.mlm import MaskedLanguageModel  # noqa: E402
from ctxvec.loading import seed_tokenizer  # noqa: E402
from ctxvec.tokenizer import Tokenizer  # noqa: E402
from ctxvec.train import Trainer, TrainConfig  # noqa: E402

PROBES = [  # held-out style sentences with one word to fill in
    "and god said , let there be [MASK] .",
    "the lord is my [MASK] ; i shall not want .",
    "in the beginning god created the heavens and the [MASK] .",
    "he went up into the [MASK] to pray .",
    "and they shall call his name [MASK] .",
]


def predictions(run: Path, tokenizer: Tokenizer) -> list[dict]:
    from ctxvec.weights.checkpoint import load_checkpoint

    _, tensors, meta = load_checkpoint(run)
    model = MaskedLanguageModel(EncoderConfig.from_dict(meta["model"])).eval()
    model.load_state_dict(tensors["model"])
    out = []
    for text in PROBES:
        enc = tokenizer.tokenize([text])[0]
        ids = torch.tensor([enc.ids])
        pos = enc.tokens.index("[MASK]")
        with torch.no_grad():
            hidden = model.encoder(ids).last_hidden_state[0, pos:pos + 1]
            logits = model.head(hidden, model.encoder.embeddings.tokens.weight)[0]
        top = logits.topk(5).indices.tolist()
        out.append({"text": text, "top5": [tokenizer.id_to_token(i) for i in top]})
    return out


def run_config(args) -> TrainConfig:
    return TrainConfig(steps=args.max_steps, batch_tokens=4096, seq_len=128, lr=1e-3, warmup=100,
                       eval_every=100, save_every=100, eval_sequences=256)


def most_frequent_baseline(trainer: Trainer) -> dict:
    """Held-out top-1 accuracy of always answering the training split's most frequent token."""
    counts = np.bincount(trainer.train_seqs.ravel(), minlength=trainer.tokenizer.vocab_size)
    counts[trainer.masking.special_ids] = 0
    top = int(counts.argmax())
    idx = np.arange(len(trainer.eval_seqs))
    _, labels, chosen = trainer.masking(trainer.eval_seqs, idx, trainer.cfg.seed, 2**31)  # evaluate()'s masks
    return {"token": trainer.tokenizer.id_to_token(top), "accuracy": float((labels[chosen] == top).mean())}


def held_out_report(trainer: Trainer) -> dict:
    """What the trained run knows on held-out text: loss, perplexity, top-1 accuracy beside the
    most-frequent-token baseline, and masked-word predictions."""
    after = trainer.evaluate()
    return {"steps": trainer.step, "after": after, "baseline": most_frequent_baseline(trainer),
            "predictions": predictions(trainer.run_dir, trainer.tokenizer)}


def train_real(args, facts) -> dict:
    run = args.out / "mlm_run"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    cfg = run_config(args)
    trainer = Trainer([SHARED_WEB], run, cfg, preset="small", progress=True)
    before = trainer.evaluate()
    trainer.log(before)
    deadline = time.perf_counter() + 60 * args.minutes
    # the schedule decays over --max-steps; the wall-clock budget may stop the run earlier
    while trainer.step < cfg.steps and time.perf_counter() < deadline:
        record = trainer.train_step()
        trainer.log(record)
        if trainer.step % cfg.eval_every == 0:
            trainer.log(trainer.evaluate())
        if trainer.step % cfg.save_every == 0:
            trainer.save()
        if trainer.step % 50 == 0:
            print(f"step {trainer.step}: loss {record['loss']:.3f}", flush=True)
    trainer.save()
    report = held_out_report(trainer)
    trainer.log(report["after"])
    subprocess.run([sys.executable, "-m", "ctxvec", "plot", str(run), "-o", str(args.out / "mlm_loss.png")],
                   check=True)
    return {"machine": facts, "date": time.strftime("%Y-%m-%d"),
            "minutes": args.minutes, "threads": args.threads, "train_sequences": len(trainer.train_seqs),
            "eval_sequences": len(trainer.eval_seqs), "before": before, **report,
            "png": "benchmarks/results/mlm_loss.png"}


def evaluate_run(args, training: dict) -> dict:
    """Re-read the finished run (its last checkpoint) and redo its held-out report."""
    trainer = Trainer([SHARED_WEB], args.out / "mlm_run", run_config(args), preset="small", resume=True,
                      progress=False)
    return {**training, **held_out_report(trainer)}


def throughput(args) -> dict:
    from transformers import BertConfig, BertForMaskedLM

    run_tokenizer = args.out / "mlm_run" / "tokenizer.json"
    # the pretraining run's WordPiece 8,000, or (no run here) the seed model's: also 8,000 on web_en.txt
    tokenizer = Tokenizer.load(run_tokenizer) if run_tokenizer.exists() else seed_tokenizer()
    vocab = tokenizer.vocab_size
    ours_cfg = EncoderConfig(vocab_size=vocab, pad_id=tokenizer.pad_id)  # the seed: 512/8/1024/12
    hf_cfg = BertConfig(vocab_size=vocab, hidden_size=512, num_attention_heads=8, intermediate_size=1024,
                        num_hidden_layers=12, hidden_act="relu", max_position_embeddings=512,
                        layer_norm_eps=1e-5, type_vocab_size=1, pad_token_id=tokenizer.pad_id)
    rng = np.random.default_rng(0)
    lines = SHARED_WEB.read_text(encoding="utf-8").splitlines()
    from ctxvec.train.mlm_data import pack_sequences
    seqs = pack_sequences(tokenizer, [lines[i:i + 100] for i in range(0, 20000, 100)], 128)
    masking = Masking.for_tokenizer(tokenizer)
    batches = []
    for step in range(args.throughput_steps + 2):
        idx = rng.choice(len(seqs), 16, replace=False)
        batches.append(masking(seqs[idx], idx, 0, step))
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        ours = MaskedLanguageModel(ours_cfg)
        torch.manual_seed(0)
        hf = BertForMaskedLM(hf_cfg)
        systems = {"ctxvec MaskedLanguageModel": ours, "HF BertForMaskedLM": hf}
        # the optimizer ctxvec's Trainer uses, for both: the comparison is of the models' steps
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in systems.items()}
        n_steps = args.throughput_steps if precision == "fp32" or machine()["native_bf16"] else args.slow_bf16_steps
        times = {k: [] for k in systems}
        losses = {k: [] for k in systems}
        for step in range(n_steps + 1):  # step 0 warms up
            inputs, labels, chosen = (torch.from_numpy(a) for a in batches[step])
            for name, model in systems.items():
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    if name.startswith("ctxvec"):
                        out = model(inputs, labels, chosen)
                        loss = out.loss_sum / out.n_predicted
                    else:
                        hf_labels = torch.where(chosen, labels, torch.full_like(labels, -100))
                        loss = model(input_ids=inputs, labels=hf_labels).loss
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                if step:
                    times[name].append(time.perf_counter() - start)
                losses[name].append(loss.item())
        tokens = 16 * 128
        results[precision] = {
            name: {"tokens_per_s": tokens / statistics.median(t), "steps": len(t), "losses": losses[name]}
            for name, t in times.items()}
        results[precision]["ratio"] = (results[precision]["ctxvec MaskedLanguageModel"]["tokens_per_s"]
                                       / results[precision]["HF BertForMaskedLM"]["tokens_per_s"])
        print(precision, {k: round(v["tokens_per_s"]) if isinstance(v, dict) else round(v, 2)
                          for k, v in results[precision].items()}, flush=True)
    return {**results, "machine": machine(), "date": time.strftime("%Y-%m-%d")}


def _machine_line(m: dict, threads: int, date: str) -> str:
    return (f"{m['cpu']} ({', '.join(m['simd'])}; native bf16: {'yes' if m['native_bf16'] else 'no'}), "
            f"{threads} threads, torch {m['torch']}; {date}")


def markdown(r: dict) -> str:
    t = r["training"]
    out = [f"**Pretraining** ({_machine_line(t.get('machine', r['machine']), t.get('threads', r['threads']), t.get('date', r['date']))}) a 4 x 256 seed-style encoder (post-norm, ReLU, sinusoidal; WordPiece 8,000 trained "
           f"on the training split) on `web_en.txt` for {t['minutes']} minutes on {t.get('threads', 2)} of the machine's "
           f"2 cores: {t['steps']} steps of "
           f"4,096 tokens; {t['train_sequences']} training and {t['eval_sequences']} held-out sequences of 128 "
           "tokens (held out: 5% of the 100-verse documents).", "",
           "| | held-out masked-LM loss | perplexity |", "|---|---:|---:|",
           f"| before (random init) | {t['before']['eval_loss']:.3f} | {t['before']['eval_perplexity']:.0f} |",
           f"| after | {t['after']['eval_loss']:.3f} | {t['after']['eval_perplexity']:.1f} |", ""]
    if "eval_accuracy" in t["after"]:
        b = t["baseline"]
        out += [f"Held-out top-1 accuracy at the masked positions: **{100 * t['after']['eval_accuracy']:.1f}%**, "
                f"against {100 * b['accuracy']:.1f}% for always answering the most frequent token "
                f"(`{b['token']}`).", ""]
    out += [f"![loss curve]({t['png']})", "", "Masked-word predictions of the trained model (top 5):", ""]
    out += [f"- `{p['text']}` -> {', '.join(p['top5'])}" for p in t["predictions"]]
    tp = r["throughput"]
    out += ["", f"**Training throughput** ({_machine_line(tp.get('machine', r['machine']), r['threads'], tp.get('date', r['date']))}), "
            "seed dims (512 / 8 / 1024 / 12), same vocabulary, batch 16 x 128, "
            "one fused AdamW step (`torch.optim.AdamW(fused=True)`, as ctxvec's Trainer) for both, "
            "dropout 0.1 in both, alternating, median:", "",
            "| precision | ctxvec tokens/s | HF BertForMaskedLM tokens/s | ratio | losses (ctxvec / HF) |",
            "|---|---:|---:|---:|---|"]
    for precision, v in ((p, v) for p, v in tp.items() if p in ("fp32", "bf16")):
        a, b = v["ctxvec MaskedLanguageModel"], v["HF BertForMaskedLM"]
        out.append(f"| {precision} ({a['steps']} steps) | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
                   f"{v['ratio']:.2f}x | {' '.join(f'{x:.2f}' for x in a['losses'])} / "
                   f"{' '.join(f'{x:.2f}' for x in b['losses'])} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--throughput-steps", type=int, default=6)
    parser.add_argument("--slow-bf16-steps", type=int, default=2,
                        help="bf16 steps where the CPU has no native bf16 (each takes minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-update", action="store_true")
    parser.add_argument("--part", choices=["all", "train", "throughput", "evaluate"], default="all",
                        help="run one half (the other is taken from the last results JSON); evaluate: "
                             "redo the held-out report of the finished run (same --max-steps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    facts = machine()
    result = {"machine": facts, "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
    previous = args.out / "train_mlm.json"
    old = json.loads(previous.read_text()) if previous.exists() and args.part != "all" else {}
    for part in ("training", "throughput"):  # results from an earlier run keep their machine and date
        if part in old:
            old[part].setdefault("machine", old["machine"])
            old[part].setdefault("date", old["date"])
    if args.part == "evaluate":
        result["training"] = evaluate_run(args, old["training"])
    else:
        result["training"] = train_real(args, facts) if args.part != "throughput" else old["training"]
    result["throughput"] = throughput(args) if args.part in ("all", "throughput") else old["throughput"]
    write_results("train_mlm", result, markdown(result), args.out, update=not args.no_update)


if __name__ == "__main__":
    main()
