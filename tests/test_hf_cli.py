"""``haprune prune-hf`` end to end on a tiny BERT classifier with its own tokenizer and a CSV data set."""
from __future__ import annotations

import csv
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast  # noqa: E402

from haprune.cli import main  # noqa: E402
from haprune.hf import TextClassifier, from_pretrained, tokenize  # noqa: E402

WORDS = ["good", "bad", "great", "awful", "film", "plot", "fun", "dull", "the", "a"]


@pytest.fixture()
def folder(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=12, max_position_embeddings=32, num_labels=2)
    model_dir = tmp_path / "clf"
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "reviews.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for _ in range(120):
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=g)]
            w.writerow([" ".join(words), "pos" if words.count("good") + words.count("great") > 1 else "neg"])
    return tmp_path


def args(folder, *extra):
    return ["prune-hf", str(folder / "clf"), "--data", str(folder / "reviews.csv"), "--text-column", "review",
            "--label-column", "sentiment", "--max-length", "10", "--calib-batches", "1", "--probes", "2",
            "--finetune-steps", "2", "--out", str(folder / "out"), *extra]


@pytest.mark.parametrize("criterion", ["hap", "michel"])
def test_prune_hf_writes_a_reloadable_smaller_model(folder, criterion, capsys):
    assert main(args(folder, "--target", "0.5", "--criterion", criterion)) == 0
    report = json.loads((folder / "out" / "report.json").read_text())
    assert report["counts"]["removed"] == 4 and report["params"]["after"] < report["params"]["before"]
    assert set(report["accuracy"]) == {"dense", "oneshot", "finetuned"}
    # compensation is on by default (--compensate auto): the output projections that lost heads were refit
    assert report["compensate"] == {"requested": "auto", "used": "sequential"} and report["compensation"]
    plan = json.loads((folder / "out" / "plan.json").read_text())
    assert sum(len(g["remove"]) for g in plan["groups"].values()) == 4
    model = TextClassifier(from_pretrained(folder / "out" / "model"))
    tok = BertTokenizerFast.from_pretrained(folder / "out" / "model")
    x = tokenize(tok, ["good film", "awful dull plot"], [1, 0], max_length=10).x
    if int(transformers.__version__.split(".")[0]) >= 5:  # no config.pruned_heads in 5.x: a plain load fails loudly
        with pytest.raises(Exception, match="mismatch"):
            BertForSequenceClassification.from_pretrained(folder / "out" / "model")
    else:
        plain = TextClassifier(BertForSequenceClassification.from_pretrained(folder / "out" / "model").eval())
        with torch.no_grad():
            assert torch.allclose(model(x), plain(x), atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    assert "units removed 4" in capsys.readouterr().out


def test_prune_hf_with_ffn_and_implants(folder):
    assert main(args(folder, "--target", "0.5", "--ffn", "--budget", "params", "--implant-ratio", "0.5",
                     "--implant-rank", "2")) == 0
    report = json.loads((folder / "out" / "report.json").read_text())
    assert report["achieved"]["removed_fraction"] >= 0.5
    model = from_pretrained(folder / "out" / "model")
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]


def test_prune_hf_errors_say_what_to_do(folder, capsys):
    assert main(args(folder, "--target", "0.5", "--text-column", "body")) == 2
    assert "--text-column" in capsys.readouterr().err
    assert main(["prune-hf", str(folder / "nowhere"), "--target", "0.5", "--out", str(folder / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(args(folder, "--target", "1.5")) == 2
    base = folder / "base"  # a bare encoder: the classifier head would be untrained
    BertModel(BertConfig.from_pretrained(folder / "clf")).save_pretrained(base)
    BertTokenizerFast.from_pretrained(folder / "clf").save_pretrained(base)
    argv = args(folder, "--target", "0.5")
    argv[1] = str(base)
    assert main(argv) == 2
    assert "--dense-steps" in capsys.readouterr().err
    assert not (folder / "out").exists()  # nothing written on failure
