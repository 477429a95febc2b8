"""What earlier versions of ctxvec wrote still loads and gives the same numbers.

The files in tests/data/legacy/ were written before the layout of issue 16 (see the README
there): a model folder, a masked-LM run with its checkpoint, and a translator folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ctxvec
from ctxvec.train import Trainer, TrainConfig
from ctxvec.translate.pipeline import load_translator

LEGACY = Path(__file__).parent / "data" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


@pytest.mark.parametrize("folder", ["model", "run"])
def test_model_folders_load_and_embed_as_before(folder):
    vectors = ctxvec.load(LEGACY / folder).embed(EXPECTED["texts"])
    assert np.abs(vectors - np.array(EXPECTED[f"{folder}_embed"])).max() < 1e-6


def test_a_translator_folder_loads_and_translates_as_before():
    translator = load_translator(LEGACY / "translator")
    assert translator.translate(EXPECTED["texts"], beam_size=1) == EXPECTED["translator_greedy"]


def test_a_training_checkpoint_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run)
    cfg = TrainConfig(steps=4, batch_tokens=8 * 32, seq_len=32, warmup=1, eval_every=2, save_every=2,
                      eval_sequences=8, doc_lines=20, vocab_size=60)
    trainer = Trainer([LEGACY / "corpus.txt"], run, cfg, preset=str(LEGACY / "tiny.json"), resume=True,
                      progress=False)
    assert trainer.step == 2
    trainer.run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {str(r["step"]): r["loss"] for r in records if "loss" in r}
    assert losses == EXPECTED["straight_losses"]  # steps 1-2 from the old run, 3-4 resumed: bit for bit
