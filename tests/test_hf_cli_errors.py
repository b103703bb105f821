"""``haprune prune-hf`` with bad input: every case gets a clear message and exit code 2 before any fine-tuning or
estimation (both replaced by functions that fail the test if called), and nothing is written to --out. Plus the
cases that used to fail and now run: a causal LM with --dense-steps (padding from the end-of-sequence token), a
3-class CSV on a 2-label head with --num-labels, compensation, and a majority-class model that is flagged."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, PreTrainedTokenizerFast, ViTConfig, ViTForImageClassification)

import haprune.hf  # noqa: E402
from haprune.cli import main  # noqa: E402
from haprune.hf import cli as hf_cli  # noqa: E402

WORDS = ["good", "bad", "great", "awful", "film", "plot", "fun", "dull", "the", "a"]


def _csv(path: Path, n: int = 60, classes: int = 2, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for i in range(n):
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (5,), generator=g)]
            w.writerow([" ".join(words), i % classes])
    return path


def _bert_folder(tmp: Path, name: str = "clf", num_labels: int = 2) -> Path:
    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=12, max_position_embeddings=32, num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(tmp / name)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp / name)
    return tmp / name


@pytest.fixture()
def no_work(monkeypatch):
    """Fine-tuning or estimation starting fails the test: errors must come first."""
    def boom(*a, **k):
        raise AssertionError("expensive work started before the bad input was refused")

    for name in ("finetune_text", "unit_importance", "evaluate_text"):
        monkeypatch.setattr(haprune.hf, name, boom)


def run(tmp: Path, model: Path, *extra: str) -> int:
    return main(["prune-hf", str(model), "--data", str(tmp / "data.csv"), "--text-column", "review",
                 "--label-column", "sentiment", "--max-length", "8", "--calib-batches", "1", "--probes", "1",
                 "--finetune-steps", "1", "--out", str(tmp / "out"), *extra])


def refused(capsys, tmp: Path, *needles: str) -> str:
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err and len(err) < 800, err  # one clear line, not a dump
    assert not (tmp / "out").exists()
    return err


def test_folder_with_only_a_config_says_the_tokenizer_is_missing(tmp_path, capsys, no_work):
    _csv(tmp_path / "data.csv")
    only = tmp_path / "only"
    BertConfig(vocab_size=15, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=12).save_pretrained(only)
    assert run(tmp_path, only, "--target", "0.5") == 2
    refused(capsys, tmp_path, "has no tokenizer", "save_pretrained")


def test_vision_folder_points_to_prune_hf_vision(tmp_path, capsys, no_work):
    _csv(tmp_path / "data.csv")
    vit = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=12, image_size=8, patch_size=4)).save_pretrained(vit)
    assert run(tmp_path, vit, "--target", "0.5") == 2
    refused(capsys, tmp_path, "image model", "haprune prune --hf-vision")


def test_more_classes_than_the_head_asks_for_num_labels(tmp_path, capsys, no_work):
    _csv(tmp_path / "data.csv", classes=3)
    clf = _bert_folder(tmp_path)
    assert run(tmp_path, clf, "--target", "0.5") == 2
    refused(capsys, tmp_path, "3 classes", "--num-labels 3 --dense-steps")
    assert run(tmp_path, clf, "--target", "0.5", "--num-labels", "3") == 2  # a new head must be trained
    refused(capsys, tmp_path, "untrained", "--dense-steps")


def test_implant_rank_above_head_dim_is_refused_before_dense_fine_tuning(tmp_path, capsys, no_work):
    _csv(tmp_path / "data.csv")
    clf = _bert_folder(tmp_path)
    assert run(tmp_path, clf, "--target", "0.5", "--implant-ratio", "0.5", "--implant-rank", "64",
               "--dense-steps", "50") == 2
    refused(capsys, tmp_path, "--implant-rank 64", "head dimension 4")


def test_implants_on_a_rotary_model_are_refused_early(tmp_path, capsys, no_work):
    _csv(tmp_path / "data.csv")
    folder = _llama_folder(tmp_path)
    assert run(tmp_path, folder, "--target", "0.5", "--implant-ratio", "0.2", "--dense-steps", "5") == 2
    refused(capsys, tmp_path, "RoPE")


@pytest.mark.parametrize("option,value,needle", [
    ("--target", "1.5", "--target"), ("--implant-ratio", "-1", "--implant-ratio"),
    ("--calib-batches", "0", "--calib-batches"), ("--distill", "2", "--distill"), ("--lr", "0", "--lr"),
    ("--num-labels", "1", "--num-labels"), ("--max-length", "1", "--max-length"),
])
def test_bad_option_values(tmp_path, capsys, no_work, option, value, needle):
    _csv(tmp_path / "data.csv")
    argv = [option, value] if option == "--target" else ["--target", "0.5", option, value]
    assert run(tmp_path, tmp_path / "nowhere", *argv) == 2  # options are checked before the folder
    refused(capsys, tmp_path, needle)


def test_out_that_is_a_file_is_refused_before_work(tmp_path, capsys, no_work):
    _csv(tmp_path / "data.csv")
    clf = _bert_folder(tmp_path)
    (tmp_path / "out").write_text("not a folder")
    assert run(tmp_path, clf, "--target", "0.5") == 2
    assert "existing file" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "not a folder"


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune-hf", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for needle in ("--text-column TEXT_COLUMN CSV column with the texts (default: text)",
                   "(default: label)", "--compensate {auto,none,sequential,dense-inputs}", "--num-labels",
                   "--hf-vision"):
        assert needle in out, needle


def test_criteria_listed_without_torch_match_the_library():
    from haprune.hf.importance import UNIT_CRITERIA

    assert hf_cli.CRITERIA == tuple(UNIT_CRITERIA)


# ------------------------------------------------------------------------------------ runs that used to fail

def _llama_folder(tmp: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")  # no pad token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=12, max_position_embeddings=32, eos_token_id=1,
                      bos_token_id=1, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "lm")
    tok.save_pretrained(tmp / "lm")
    return tmp / "lm"


def test_causal_lm_with_dense_steps_pads_with_eos_and_compensates(tmp_path, capsys):
    _csv(tmp_path / "data.csv")
    folder = _llama_folder(tmp_path)
    assert run(tmp_path, folder, "--target", "0.5", "--dense-steps", "2", "--compensate", "sequential") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["removed"] == 2  # 2 of the 4 key/value groups
    assert report["compensation"]["mode"] == "sequential" and report["compensation"]["layers"]
    for layer in report["compensation"]["layers"].values():
        assert layer["sse_after"] <= layer["sse_before"] + 1e-9
    cfg = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert cfg["pad_token_id"] == 1
    assert (tmp_path / "out" / "run.json").is_file()


def test_three_classes_with_num_labels_and_dense_inputs_compensation(tmp_path):
    _csv(tmp_path / "data.csv", classes=3)
    clf = _bert_folder(tmp_path)
    assert run(tmp_path, clf, "--target", "0.5", "--num-labels", "3", "--dense-steps", "2", "--ffn",
               "--compensate", "dense-inputs") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["num_labels"] == 3 and report["compensation"]["mode"] == "dense-inputs"
    model = haprune.hf.from_pretrained(tmp_path / "out" / "model")
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]


def test_majority_class_model_is_flagged(tmp_path, capsys):
    _csv(tmp_path / "data.csv", n=60, classes=2)
    with (tmp_path / "data.csv").open("a", newline="") as f:  # make class 0 the majority
        w = csv.writer(f)
        for _ in range(40):
            w.writerow(["the film", 0])
    clf = _bert_folder(tmp_path)
    model = BertForSequenceClassification.from_pretrained(clf)
    with torch.no_grad():  # a head that always answers class 0
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, -5.0]))
    model.save_pretrained(clf)
    assert run(tmp_path, clf, "--target", "0.5", "--finetune-steps", "0", "--criterion", "magnitude") == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accuracy"]["dense"] == report["majority_class_rate"] > 0.5
    assert len(report["warnings"]) == 3 and all("majority-class rate" in w for w in report["warnings"])
    assert "WARNING" in captured.out and "majority-class" in captured.err
