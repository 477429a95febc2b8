"""Fine-tuning sentence vectors contrastively (``FinetuneTrainer``): a whole encoder, its pooling
and normalisation as the model defines them, trained on scored pairs (CoSENT, cosine) or on
(anchor, positive[, negative]) rows (MultipleNegativesRankingLoss), evaluated on dev pairs.

On ``TrainingRun``: progress bar, metrics.jsonl, atomic checkpoints, exact resume and
``torchrun``. With several processes the sentence vectors of the whole batch are gathered (with
their gradients) before the loss, so in-batch negatives and CoSENT's pairs span every process's
rows: 2 processes train as 1 with the same global batch.

The run folder's top is the model (``ctxvec.load(run)``): with ``--dev``, the checkpoint with
the best dev Spearman so far (``best.json`` says which step); without, the latest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctxvec.engine.batching import rounded_width
from ctxvec.evaluation import correlations, pair_cosines
from ctxvec.files import atomic_write_text, read_json
from ctxvec.loading import load
from ctxvec.model.encoder import Encoder
from ctxvec.model.pooling import Pooling
from ctxvec.pairs import ScoredPairs, TextRows, read_scored_pairs, read_text_rows
from ctxvec.pipeline import Pipeline
from ctxvec.tokenizer import Encoded
from ctxvec.train.losses import DEFAULT_SCALE, LOSSES, cosent_loss, cosine_loss, mnrl_loss
from ctxvec.train.run import TrainConfig, TrainingRun
from ctxvec.weights.folders import write_encoder_folder

BEST_FILE = "best.json"


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning options. ``steps`` is set from ``epochs`` unless given; ``batch_size`` rows
    (pairs or anchor rows) per optimizer step, over all processes."""

    loss: str = "cosent"
    epochs: int = 1
    batch_size: int = 16
    steps: int | None = None  # type: ignore[assignment]  (None: epochs x batches per epoch)
    lr: float = 2e-5
    warmup: int = 0
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 100
    dropout: float = 0.1  # the encoder's, while training (BERT's own)
    scale: float = DEFAULT_SCALE  # cosines x scale in CoSENT and MNRL
    symmetric: bool = False  # MNRL both ways
    max_score: float = 5.0  # cosine loss: the score that means "the same" (STS: 5)

    def __post_init__(self) -> None:
        steps = self.steps
        self.steps = 1 if steps is None else steps  # checked with the others, then put back
        super().__post_init__()
        self.steps = steps
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}.")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.grad_accum != 1:
            raise ValueError("fine-tuning takes no grad_accum: the loss compares every row of a batch with "
                             "every other, so a batch must be computed whole.")
        if self.symmetric and self.loss != "mnrl":
            raise ValueError("symmetric is an option of the mnrl loss.")
        if not (self.scale > 0 and self.max_score > 0 and 0.0 <= self.dropout < 1.0):
            raise ValueError("scale and max_score must be positive and dropout in [0, 1).")


class SentenceEncoder(nn.Module):
    """Encoder + pooling: (B, T) token ids -> (B, D) sentence vectors, differentiable."""

    def __init__(self, encoder: Encoder, pooling: Pooling) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask).last_hidden_state  # (B, T, D)
        return self.pooling(hidden.float(), attention_mask)  # (B, D), pooled in fp32


def gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every process's rows of ``x`` in rank order, gradients flowing back to their owners."""
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


class FinetuneTrainer(TrainingRun):
    """Fine-tune ``model`` (a name or folder, as ``ctxvec.load``) on ``data``; ``run()`` trains.

    Args:
        data: scored pairs (cosent, cosine) or anchor rows (mnrl), a CSV/TSV file (``ctxvec.pairs``).
        run: the run folder.
        cfg: the options.
        model: the model to start from.
        dev: scored pairs to evaluate on (Spearman of the cosine), or None.
    """

    count_name = "rows"

    def __init__(self, data: str | Path, run: str | Path, cfg: FinetuneConfig, model: str = "minilm",
                 dev: str | Path | None = None, resume: bool = False, progress: bool = True) -> None:
        super().__init__(run, cfg, resume, progress)
        self.examples: ScoredPairs | TextRows = (read_text_rows(data) if cfg.loss == "mnrl"
                                                 else read_scored_pairs(data))
        self.dev = read_scored_pairs(dev) if dev is not None else None
        base = load(model)
        self.tokenizer, self.pooling, self.base_name = base.tokenizer, base.pooling, str(model)
        self.columns = [self.tokenizer.tokenize(c) for c in self._text_columns(self.examples)]
        self.labels = (torch.tensor(self.examples.scores, dtype=torch.float32)
                       if isinstance(self.examples, ScoredPairs) else None)
        if cfg.batch_size % self.d.world:
            raise ValueError(f"the batch size {cfg.batch_size} must be a multiple of the {self.d.world} processes.")
        self.per_epoch = len(self.examples) // cfg.batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{self.examples.source} has {len(self.examples)} rows, fewer than one batch "
                             f"({cfg.batch_size}); lower --batch-size.")
        if cfg.steps is None:
            self.cfg = cfg = replace(cfg, steps=cfg.epochs * self.per_epoch)
        self.config = base.encoder.config.replace(dropout=cfg.dropout)
        self.best = self._read_best()

        def make() -> SentenceEncoder:
            encoder = Encoder(self.config)
            encoder.load_state_dict(base.encoder.state_dict())
            return SentenceEncoder(encoder, self.pooling)

        meta = {"encoder": self.config.to_dict(), "base": self.base_name,
                "pooling": {"mode": self.pooling.mode, "normalize": self.pooling.normalize}}
        self.build_model(make, meta)

    @staticmethod
    def _text_columns(examples: ScoredPairs | TextRows) -> list[list[str]]:
        return [examples.first, examples.second] if isinstance(examples, ScoredPairs) else examples.columns

    def describe(self) -> dict:
        return {"base": self.base_name, "rows": len(self.examples), "columns": len(self.columns),
                "dev_pairs": len(self.dev) if self.dev is not None else 0, "batches_per_epoch": self.per_epoch}

    # -- data --
    def epoch_of(self, step: int) -> int:
        return step // self.per_epoch

    def batch_indices(self, step: int) -> np.ndarray:
        """This step's rows: an epoch's permutation, sliced (the last partial batch is left out)."""
        epoch, slot = divmod(step, self.per_epoch)
        order = np.random.default_rng((self.cfg.seed, epoch)).permutation(len(self.examples))
        return order[slot * self.cfg.batch_size:(slot + 1) * self.cfg.batch_size]

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        """One batch: this process's rows (rank r: the r-th slice), every column padded together."""
        rows = self.batch_indices(step).reshape(self.d.world, -1)[self.d.rank]
        encoded: list[Encoded] = [column[i] for column in self.columns for i in rows]  # column-major
        width = rounded_width(max(len(e.ids) for e in encoded))
        batch = self.tokenizer.pad(encoded, length=width)
        labels = self.labels[torch.from_numpy(rows)] if self.labels is not None else torch.zeros(len(rows))
        return [(batch.input_ids.to(self.d.device), batch.attention_mask.to(self.d.device), labels)]

    def count(self, batch) -> int:
        return len(batch[2])

    def tokens(self, batch) -> int:
        return int(batch[1].sum())

    def loss_sum(self, model: nn.Module, batch) -> torch.Tensor:
        """The loss of the whole (global) batch, x rows / processes: ``TrainingRun`` divides the
        sum over processes by the global rows."""
        input_ids, attention_mask, labels = batch
        vectors = model(input_ids, attention_mask)  # (columns x rows, D)
        columns = [gather_rows(c, self.d.world) for c in vectors.chunk(len(self.columns))]  # each (batch, D)
        labels = gather_rows(labels.to(vectors.device), self.d.world)
        cfg = self.cfg
        if cfg.loss == "cosent":
            loss = cosent_loss(columns[0], columns[1], labels, cfg.scale)
        elif cfg.loss == "cosine":
            loss = cosine_loss(columns[0], columns[1], labels / cfg.max_score)
        else:
            loss = mnrl_loss(columns[0], columns[1], columns[2] if len(columns) > 2 else None, cfg.scale,
                             cfg.symmetric)
        return loss * (cfg.batch_size / self.d.world)

    # -- evaluation and the model --
    def pipeline(self) -> Pipeline:
        """The model being trained, as a pipeline (fp32, eval mode until the next step)."""
        return Pipeline(self.tokenizer, self.model.encoder, self.pooling, name=str(self.run_dir))

    @torch.no_grad()
    def evaluate(self) -> dict:
        record: dict = {"step": self.step}
        if self.dev is None:
            return record
        cosines, _ = pair_cosines(self.pipeline(), self.dev)
        spearman, pearson = correlations(cosines, self.dev.scores, self.dev.source)
        if self.best is None or spearman > self.best["dev_spearman"]:
            self.best = {"step": self.step, "dev_spearman": spearman}
            if self.d.main:
                self._write_model()
                atomic_write_text(self.run_dir / BEST_FILE, json.dumps(self.best) + "\n")
        return {**record, "dev_spearman": spearman, "dev_pearson": pearson,
                "best_dev_spearman": self.best["dev_spearman"], "best_step": self.best["step"]}

    def _read_best(self) -> dict | None:
        path = self.run_dir / BEST_FILE
        if self.dev is None or self._existing is None or not path.is_file():
            return None
        best = read_json(path)
        if not (isinstance(best, dict) and isinstance(best.get("step"), int)
                and isinstance(best.get("dev_spearman"), float) and math.isfinite(best["dev_spearman"])):
            raise ValueError(f"{path} is not a best-checkpoint record; remove it to start the best over.")
        return best

    def export(self) -> None:
        """At every save: the latest model, unless ``--dev`` chooses the best (``evaluate``)."""
        if self.dev is None:
            self._write_model()

    def _write_model(self) -> None:
        state = {k: v.float() for k, v in self.model.encoder.state_dict().items()}
        write_encoder_folder(self.run_dir, state, self.config, self.tokenizer, self.pooling, self.tokenizer.max_len,
                             f"{self.base_name} fine-tuned by ctxvec with the {self.cfg.loss} loss ({self.run_dir})")
