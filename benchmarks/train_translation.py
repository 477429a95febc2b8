"""Spanish -> English translation on the Bible corpus, for a fixed wall-clock budget.

    .venv/bin/python benchmarks/train_translation.py [--minutes 30] [--threads 2]

1. Reads ../shared/data/bible_es_en.tsv (Reina-Valera 1909 -> World English Bible), holds out
   whole books (validation: Ruth, Joel, Philippians, Jude; test: Jonah, Nahum, Titus, James,
   I John), trains a joint BPE (10,000) on the training books.
2. Trains the "small" translator (3 + 3 pre-norm layers x 256, 4 heads, FFN 1024, tied
   embeddings, label smoothing 0.1) with ``TranslationTrainer`` - the machinery of
   ``ctxvec train-translation`` - timing the first steps to size the schedule so that the
   learning rate decays to 0 just as the budget ends.
3. On the test books: sacrebleu BLEU and chrF (detokenized, signatures printed) of greedy and
   beam-4 translations, next to two baselines on the same sentences: copying the source, and
   the untrained model. Learning curve (loss + held-out BLEU) to PNG; a few translations.
Writes benchmarks/results/train_translation.{json,md} and updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_results  # noqa: E402

from ctxvec.model.translator import Translator  # noqa: E402
from ctxvec.train.plot import plot_run  # noqa: E402
from ctxvec.translate.trainer import TranslationConfig, TranslationTrainer  # noqa: E402
from ctxvec.translate.pipeline import translate_texts  # noqa: E402
from ctxvec.translate.scores import score_translations  # noqa: E402

PAIRS = ROOT.parent / "shared" / "data" / "bible_es_en.tsv"
SHOWN = 6  # test sentences shown side by side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=6144)
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--vocab-size", type=int, default=10000)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast, where the CPU has native bf16 (AVX512-BF16/AMX)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-update", action="store_true")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the Markdown (and projection) from the last results JSON")
    args = parser.parse_args()
    if args.report:
        import json

        result = json.loads((args.out / "train_translation.json").read_text())
        result["projection"] = projection(result["bleu_curve"], result["steps"], result["seconds_per_step"])
        write_results("train_translation", result, markdown(result), args.out, update=not args.no_update)
        return
    torch.set_num_threads(args.threads)
    run = args.out / "translation_run"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    started = time.perf_counter()
    cfg = TranslationConfig(steps=100_000, batch_tokens=args.batch_tokens, seq_len=128, eval_every=250,
                            save_every=250, eval_sentences=150, lr=args.lr, vocab_size=args.vocab_size,
                            precision=args.precision)
    trainer = TranslationTrainer(PAIRS, run, cfg, preset="small")
    setup_s = time.perf_counter() - started
    trainer.log({"event": "start", **trainer.describe(), "model": trainer.model_meta})
    before = trainer.evaluate()
    trainer.log(before)

    # size the schedule: time a few steps, then let the decay end with the budget
    budget = 60 * args.minutes - (time.perf_counter() - started)
    probe_start = time.perf_counter()
    for _ in range(10):
        trainer.log(trainer.train_step())
    per_step = (time.perf_counter() - probe_start) / 10
    eval_reserve = 0.12 * budget  # periodic held-out evaluations (BLEU decoding)
    cfg.steps = max(20, int((budget - eval_reserve) / per_step))
    cfg.warmup = min(cfg.warmup, cfg.steps // 10)
    cfg.eval_every = max(10, cfg.steps // 8)  # about 8 points on the learning curve
    print(f"{per_step:.2f} s/step -> {cfg.steps} steps in {args.minutes} minutes", flush=True)
    deadline = started + 60 * args.minutes
    while trainer.step < cfg.steps and time.perf_counter() < deadline:
        record = trainer.train_step()
        trainer.log(record)
        if trainer.step % cfg.eval_every == 0:
            last = trainer.evaluate()
            trainer.log(last)
            print(f"step {trainer.step}/{cfg.steps}: loss {record['loss']:.3f}, held-out {last}", flush=True)
    train_s = time.perf_counter() - started
    after = trainer.evaluate()
    trainer.log(after)
    trainer.save()
    plot_run(run, args.out / "translation_curve.png")

    test = trainer.test_pairs
    sources, references = [p.source for p in test], [p.target for p in test]
    systems = {}
    t0 = time.perf_counter()
    greedy = translate_texts(trainer.model, trainer.tokenizer, sources, max_len=cfg.seq_len, beam_size=1)
    systems["ctxvec, greedy"] = (greedy, time.perf_counter() - t0)
    t0 = time.perf_counter()
    beam = translate_texts(trainer.model, trainer.tokenizer, sources, max_len=cfg.seq_len, beam_size=4, alpha=0.6)
    systems["ctxvec, beam 4 (alpha 0.6)"] = (beam, time.perf_counter() - t0)
    systems["baseline: copy the source"] = (sources, 0.0)
    torch.manual_seed(cfg.seed)
    untrained = Translator(trainer.config).eval()
    t0 = time.perf_counter()
    systems["baseline: untrained model, greedy"] = (
        translate_texts(untrained, trainer.tokenizer, sources, max_len=cfg.seq_len, beam_size=1,
                        max_length=64), time.perf_counter() - t0)
    scores = {name: {**score_translations(out, references), "seconds": s} for name, (out, s) in systems.items()}
    for name, s in scores.items():
        print(f"{name}: BLEU {s['bleu']:.2f} chrF {s['chrf']:.2f}", flush=True)

    curve = [(r["step"], r["eval_bleu"]) for r in _records(run) if "eval_bleu" in r]
    result = {
        "machine": machine(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
        "minutes": args.minutes, "setup_s": setup_s, "train_s": train_s, "seconds_per_step": per_step,
        "steps": trainer.step, "batch_tokens": cfg.batch_tokens, "lr": cfg.lr, "warmup": cfg.warmup,
        "precision": cfg.precision,
        "data": trainer.describe(),
        "model": trainer.model_meta, "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "before": before, "after": after, "test": scores, "bleu_curve": curve,
        "projection": projection(curve, cfg.steps, per_step),
        "examples": [{"source": s, "reference": r, "greedy": g, "beam": b}
                     for s, r, g, b in list(zip(sources, references, greedy, beam))[:: max(1, len(test) // SHOWN)][:SHOWN]],
        "png": str((args.out / "translation_curve.png").resolve().relative_to(ROOT)),
    }
    write_results("train_translation", result, markdown(result), args.out, update=not args.no_update)


def _records(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def projection(curve: list[tuple[int, float]], steps: int, per_step: float) -> dict:
    """A rough projection of the steps (and hours here) to held-out BLEU 15.

    The last segment of the held-out BLEU curve, extended as a straight line in steps. Learning
    curves are not straight (early on they accelerate, later they flatten), so this is an order
    of magnitude, not a promise.
    """
    points = [(s, b) for s, b in curve if s > 0]
    if len(points) < 2:
        return {}
    s1, b1 = points[-1]
    # the last segment spanning at least an eighth of the run (not the final re-evaluation)
    s0, b0 = next(((s, b) for s, b in reversed(points) if s1 - s >= max(10, s1 // 8)), points[0])
    if b1 >= 15:
        return {"reached": True}
    slope = (b1 - b0) / max(1, s1 - s0)  # BLEU per step
    if slope <= 0:
        return {"reached": False, "bleu_per_1000_steps": slope * 1000}
    target = s1 + (15 - b1) / slope
    return {"reached": False, "bleu_per_1000_steps": slope * 1000, "steps_for_bleu_15": int(target),
            "hours_here": target * per_step / 3600}


def markdown(r: dict) -> str:
    m, d = r["machine"], r["data"]
    sig = next(iter(r["test"].values()))
    lines = [
        f"Machine: {m['cpu']} ({', '.join(m.get('simd', []))}), {r['threads']} threads, torch {m['torch']}; "
        f"{r['date']}.", "",
        f"**Spanish -> English**, `bible_es_en.tsv` (Reina-Valera 1909 -> World English Bible): "
        f"{d['train_pairs']:,} training pairs ({d['dropped_long_pairs']} over 128 tokens dropped); held out whole "
        f"books: validation {', '.join(d['held_out']['valid'])} ({d['valid_pairs']} verses), test "
        f"{', '.join(d['held_out']['test'])} ({d['test_pairs']} verses). Joint BPE "
        f"{r['model']['encoder']['vocab_size']:,}; model 3 + 3 pre-norm layers x 256, 4 heads, FFN 1024, tied "
        f"embeddings ({r['parameters'] / 1e6:.1f} M parameters), label smoothing 0.1, AdamW (peak lr "
        f"{r.get('lr', 7e-4):g}, {r.get('warmup', 0)} warm-up steps, linear decay), batches of "
        f"{r['batch_tokens']:,} tokens, "
        + ("bf16 autocast (weights, optimizer state and evaluation in fp32)." if r.get("precision") == "bf16"
           else "fp32."), "",
        f"Budget: {r['minutes']} minutes wall clock on {r['threads']} of the machine's 2 cores = {r['steps']} steps "
        f"({r['seconds_per_step']:.2f} s/step). Held-out (validation) loss {r['before']['eval_loss']:.2f} -> "
        f"{r['after']['eval_loss']:.2f}, perplexity {r['before']['eval_perplexity']:.0f} -> "
        f"{r['after']['eval_perplexity']:.1f}.", "",
        "Test books, sacrebleu (detokenized):", "",
        "| system | BLEU | chrF |", "|---|---:|---:|",
    ]
    lines += [f"| {name} | {s['bleu']:.2f} | {s['chrf']:.2f} |" for name, s in r["test"].items()]
    lines += ["", f"Signatures: `{sig['bleu_signature']}`, `{sig['chrf_signature']}`.", ""]
    p = r["projection"]
    if p.get("steps_for_bleu_15"):
        lines += [f"BLEU 15 was not reached in the budget. Extending the last segment of the held-out BLEU "
                  f"curve (+{p['bleu_per_1000_steps']:.1f} BLEU per 1,000 steps) as a straight line puts it near "
                  f"step {p['steps_for_bleu_15']:,}, about {p['hours_here']:.1f} hours at this run's speed: an "
                  "order of magnitude only (learning curves accelerate early and flatten later).", ""]
    lines += [f"![learning curve]({r['png']})", "", "Test translations (beam 4) beside the references:", "",
              "| Spanish (source) | ctxvec | reference (WEB) |", "|---|---|---|"]
    lines += [f"| {e['source']} | {e['beam']} | {e['reference']} |".replace("\n", " ") for e in r["examples"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
