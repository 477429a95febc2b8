"""Reading pairs files, and STS evaluation against sentence-transformers' evaluator."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

import ctxvec
from ctxvec.cli import main
from ctxvec.evaluation import correlations, evaluate_pairs
from ctxvec.pairs import ScoredPairs, read_scored_pairs, read_text_rows

DATA = Path(__file__).parent / "data" / "stsb"
SHARED_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb_en_dev.csv"


@pytest.fixture(scope="module")
def minilm():
    return ctxvec.load("minilm")


# ---- reading ----------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["csv", "tsv", "csv with header", "tsv with named columns"])
def test_pairs_files_in_every_form_read_the_same(tmp_path, form):
    rows = [("A man, a plan.", 'He said "yes".', "4.5"), ("One.", "Two.", "0"), ("Three.", "Four.", "2.25")]
    if form.startswith("csv"):
        path = tmp_path / "p.csv"
        text = "".join(f'"{a}","{b.replace(chr(34), chr(34) * 2)}",{s}\n' for a, b, s in rows)
        path.write_text(("sentence1,sentence2,score\n" if "header" in form else "") + text)
    else:
        path = tmp_path / "p.tsv"
        body = [f"x\t{b}\t{a}\t{s}" for a, b, s in rows] if "named" in form else [f"{a}\t{b}\t{s}" for a, b, s in rows]
        header = "id\tsentence2\tsentence1\tscore\n" if "named" in form else ""
        path.write_text(header + "\n".join(body) + "\n")
    pairs = read_scored_pairs(path)
    assert pairs.first == [r[0] for r in rows] and pairs.second == [r[1] for r in rows]
    assert pairs.scores.tolist() == [4.5, 0.0, 2.25]


@pytest.mark.parametrize("content, message", [
    ("a,b,1\nc,d\n", r"p\.csv line 2: expected 3 columns"),
    ("a,b,1\nc,d,high\n", r"p\.csv line 2: the score 'high' is not a finite number"),
    ("a,b,1\nc,d,nan\n", r"line 2: the score 'nan'"),
    ("a,b,1\n,d,2\n", r"line 2: sentence1 is empty"),
    ("a,b,1\nc,  ,2\n", r"line 2: sentence2 is empty"),
    ("", r"p\.csv has no rows"),
    ("\n\n", r"p\.csv has no rows"),
    ("sentence1,sentence2,score\n", r"has a header line but no pairs"),
    ('a,b,1\n"c,d,2\n', r"p\.csv line \d+: .*"),
    ("a,b,1\nc,d,2,e\n", r"line 2: expected 3 columns .* found 4"),
    ("a,b\nc,d,2\n", r"p\.csv line 1: expected 3 columns .* found 2"),  # not taken for a header
    ("a,b,nan\nc,d,2\n", r"line 1: the score 'nan' is not a finite number"),  # a number: not a header
])
def test_bad_pairs_files_are_one_line_errors_naming_the_line(tmp_path, content, message):
    path = tmp_path / "p.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_scored_pairs(path)
    assert "\n" not in str(err.value)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"a,b,1\nc,d,2\n\xff\xfe,e,3\n")
    with pytest.raises(ValueError, match=r"p\.csv line 3: not UTF-8"):
        read_scored_pairs(path)


def test_a_field_over_the_csv_limit_is_one_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('a,b,1\n"' + "x" * 200_000 + '",b,2\n')
    with pytest.raises(ValueError, match=r"p\.csv line 2: field larger than field limit"):
        read_scored_pairs(path)


@pytest.mark.parametrize("content, columns", [
    ("anchor,positive\nq1,p1\nq2,p2\n", 2),
    ("q1\tp1\tn1\nq2\tp2\tn2\n", 3),
])
def test_contrastive_rows(tmp_path, content, columns):
    path = tmp_path / ("r.tsv" if "\t" in content else "r.csv")
    path.write_text(content)
    rows = read_text_rows(path)
    assert rows.anchors == ["q1", "q2"] and rows.positives == ["p1", "p2"]
    assert len(rows.columns) == columns and (rows.negatives == ["n1", "n2"]) == (columns == 3)


@pytest.mark.parametrize("content, message", [
    ("q1,p1\nq2,p2,n2\n", r"line 2: expected 2 columns like the first row, found 3"),
    ("q1\n", r"line 1: expected 2 or 3 columns"),
    ("q1,p1,n1,x1\n", r"line 1: expected 2 or 3 columns"),
    ("q1,p1\nq2,\n", r"line 2: column 2 is empty"),
])
def test_bad_contrastive_rows(tmp_path, content, message):
    path = tmp_path / "r.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_text_rows(path)


# ---- correlations -------------------------------------------------------------------------------

def test_correlations_are_scipys_with_ties_and_refuse_constant_gold():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 6, 200).astype(float)  # many ties, as STS has
    predicted = gold + rng.normal(0, 2, 200)
    spearman, pearson = correlations(predicted, gold)
    assert spearman == pytest.approx(100 * stats.spearmanr(gold, predicted)[0])
    assert pearson == pytest.approx(100 * stats.pearsonr(gold, predicted)[0])
    assert 0 < spearman < 100
    with pytest.raises(ValueError, match="every gold score is 3"):
        correlations(predicted, np.full(200, 3.0))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        correlations(predicted[:1], gold[:1])
    assert correlations(np.ones(200), gold) == (0.0, 0.0)  # a model that ranks nothing: no NaN


# ---- against sentence-transformers ------------------------------------------------------------

def _st_figures(pairs: ScoredPairs) -> tuple[float, float]:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from ctxvec.weights.huggingface import minilm_dir

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    evaluator = EmbeddingSimilarityEvaluator(pairs.first, pairs.second, pairs.scores.tolist(), name="x")
    figures = evaluator(model)
    return 100 * figures["x_spearman_cosine"], 100 * figures["x_pearson_cosine"]


@pytest.mark.parametrize("path", [
    DATA / "dev_sample.csv",
    pytest.param(SHARED_DEV, marks=[pytest.mark.slow, pytest.mark.skipif(
        not SHARED_DEV.is_file(), reason="needs ../shared/data/stsb_en_dev.csv beside the checkout")]),
], ids=["sample", "stsb-dev"])
def test_the_same_figures_as_sentence_transformers_evaluator(minilm, path):
    pairs = read_scored_pairs(path)
    ours = evaluate_pairs(minilm, pairs)
    spearman, pearson = _st_figures(pairs)
    assert abs(ours.spearman - spearman) < 0.01 and abs(ours.pearson - pearson) < 0.01
    assert ours.n_pairs == len(pairs) and ours.n_texts == 2 * len(pairs) and ours.n_truncated == 0
    assert 50 < ours.spearman < 100  # a real model on real pairs: strongly correlated


def test_truncated_texts_are_counted(minilm):
    long = " ".join(["word"] * 400)
    result = evaluate_pairs(minilm, [(long, "a word", 1.0), ("a cat", "a dog", 2.0), ("sun", long + " more", 0.5)])
    assert result.n_truncated == 2 and result.n_pairs == 3


def test_pairs_given_in_python_are_checked(minilm):
    with pytest.raises(ValueError, match="pair 1 must be"):
        evaluate_pairs(minilm, [("a", "b", 1.0), ("a", "b", "high")])


# ---- the command -------------------------------------------------------------------------------

def test_evaluate_command_prints_the_figures_and_json(tmp_path):
    path = DATA / "dev_sample.csv"
    expected = evaluate_pairs(ctxvec.load("minilm"), path)
    out = CliRunner().invoke(main, ["evaluate", str(path), "--json"])
    assert out.exit_code == 0, out.output
    record = json.loads(out.output)
    assert record["spearman"] == pytest.approx(expected.spearman, abs=1e-9)
    assert record["n_pairs"] == 64 and record["model"] == "minilm" and record["precision"] == "fp32"
    out = CliRunner().invoke(main, ["evaluate", str(path)])
    assert out.exit_code == 0 and f"Spearman {expected.spearman:.2f}" in out.output
    assert "0 of 128 texts truncated" in out.output


@pytest.mark.parametrize("content, message", [
    ("a,b,1\nc,d,x\n", "line 2: the score 'x' is not a finite number"),
    (None, "no such file"),
])
def test_evaluate_command_bad_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "p.csv"
    if content is not None:
        path.write_text(content)
    out = CliRunner().invoke(main, ["evaluate", str(path)])
    assert out.exit_code == 1
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0]
