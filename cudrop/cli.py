"""The ``cudrop`` command: ``cudrop info``, ``cudrop train``, ``cudrop repro`` and
``cudrop launch``.

Every flag is checked before training starts (paths included), a flag that does not apply to
the chosen model is an error, and errors name the flag.

``cudrop train`` started by a launcher with more than one rank (torchrun, ``cudrop launch``,
mpirun, srun: ``cudrop.distributed.env``) trains data-parallel: each rank on its GPU
``LOCAL_RANK``, ``--batch-size`` per rank, gradients averaged over NCCL; only rank 0 prints and
writes ``--save`` / ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

MODELS = ("mlp", "resnet20", "resnet56", "gpt", "vit")
DATASETS = ("digits", "mnist", "fashion", "shakespeare")
IMAGE_DATA = ("digits", "mnist", "fashion")

# Per-model defaults that a flag overrides; chosen so the default digits run learns in seconds.
DEFAULTS = {
    "mlp": dict(epochs=20, batch_size=64, lr=1e-3, optimizer="adam"),
    "resnet20": dict(epochs=10, batch_size=128, lr=0.1, optimizer="sgd"),
    "resnet56": dict(epochs=10, batch_size=128, lr=0.1, optimizer="sgd"),
    "vit": dict(epochs=20, batch_size=64, lr=3e-3, optimizer="adamw"),
    "gpt": dict(epochs=5, batch_size=32, lr=1e-3, optimizer="adamw"),
}
# Flags that define the run: a resumed run takes them from its checkpoint.
RUN_FLAGS = ("model", "data", "dropout", "p", "depth_dropout", "stochastic_depth",
             "stochastic_depth_mode", "drop_downsampling", "epochs", "batch_size", "lr",
             "optimizer", "warmup", "seed", "steps_per_epoch", "precision")
GLOBAL_DEFAULTS = dict(model="mlp", dropout="dropout", p=0.1, depth_dropout=0.0,
                       stochastic_depth=0.0, stochastic_depth_mode="batch",
                       drop_downsampling=False, seed=0, warmup=0, precision="auto")


class UsageError(Exception):
    """A bad flag, reported as ``cudrop train: error: ...`` with exit code 2."""


def _defaults_table():
    rows = ["per-model defaults (a flag overrides them):"]
    for m, d in DEFAULTS.items():
        rows.append(f"  {m:9s} " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items()))
    rows.append("  gpt trains on shakespeare with --steps-per-epoch 200; the other models on "
                "digits, one full pass per epoch")
    return "\n".join(rows)


def _parser():
    from . import __version__
    from .nn import DROPOUT_KINDS
    p = argparse.ArgumentParser(prog="cudrop", description="Structured dropout that skips the "
                                "dropped work: train models, show the installation.")
    p.add_argument("--version", action="version", version=f"cudrop {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{info,train,repro,launch}")
    sub.add_parser("info", help="versions, backend, GPU and kernel cache")
    t = sub.add_parser("train", help="train a model on a real data set",
                       description="Train a model with a dropout variant. Defaults in "
                       "brackets; per-model defaults below.", epilog=_defaults_table(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a = t.add_argument
    a("--model", choices=MODELS, help="architecture [mlp]")
    a("--data", choices=DATASETS, help="data set [digits; shakespeare for gpt]")
    a("--dropout", choices=DROPOUT_KINDS, help="variant that drops hidden units (README) [dropout]")
    a("--p", type=float, help="drop probability of --dropout, in [0, 1) [0.1]")
    a("--depth-dropout", type=float, metavar="P", help="resnets: drop each residual branch with "
      "probability P (Guo & Gould; trainable 1x1 shortcuts) [0]")
    a("--stochastic-depth", type=float, metavar="P_L", help="resnets: stochastic depth, last "
      "unit dropped with probability P_L, linear decay [0]")
    a("--stochastic-depth-mode", choices=("batch", "sample"),
      help="with --stochastic-depth: one gate per batch or per sample [batch]")
    a("--drop-downsampling", action="store_true", default=None,
      help="with --depth-dropout or --stochastic-depth: let the stride-2 units be dropped too")
    a("--epochs", type=int, help="passes over the data [per model]")
    a("--steps-per-epoch", type=int, metavar="N", help="cap each epoch at N steps "
      "[gpt: 200; others: the whole training set]")
    a("--batch-size", type=int, help="per rank in a data-parallel run [per model]")
    a("--lr", type=float, help="peak learning rate, cosine decay to 0 [per model]")
    a("--warmup", type=int, metavar="STEPS", help="linear learning-rate warm-up steps, then "
      "the cosine decay [0]")
    a("--optimizer", choices=("sgd", "adam", "adamw", "rmsprop"), help="[per model]")
    a("--seed", type=int, help="seed of the weights, data order and masks [0]")
    a("--device", choices=("auto", "cpu", "gpu"), default="auto",
      help="auto: the GPU when CuPy sees one [auto]")
    a("--precision", choices=("auto", "fp32", "tf32", "bf16", "fp16"),
      help="fp32: exact float32; tf32: float32 weights, TF32 tensor-core products; bf16: "
      "bfloat16 compute with float32 master weights and float32 softmax/norm statistics "
      "(GPU only); fp16: float16 compute, float32 master weights and dynamic loss scaling. "
      "auto: bf16 on a GPU with bf16 tensor cores (sm_80+), else fp32 [auto]")
    a("--save", metavar="PATH", help="checkpoint the whole training state to PATH at each "
      "epoch's end (atomically: an interrupted run leaves the last complete one)")
    a("--save-every", type=int, metavar="N", help="with --save: also every N steps")
    a("--resume", metavar="PATH", help="continue the run saved at PATH (its flags are used; "
      "giving a different value is an error)")
    a("--json", metavar="PATH", help="write config and metrics as JSON to PATH")
    a("--no-progress", action="store_true", help="no progress bar or progress lines")
    a("--graph", action=argparse.BooleanOptionalAction, default=None,
      help="record the training step once as a CUDA graph and replay it for every batch (same "
      "results, no Python per op; steps that cannot be captured run eagerly after a warning) "
      "[on a single GPU]")
    r = sub.add_parser("repro", help="reproduce a source paper's table, with plots",
                       description="Run an experiment's grid (one JSON per run; a rerun skips "
                       "finished runs and continues an interrupted one), then write report.md "
                       "with the paper's numbers beside ours and PNG plots.")
    r.add_argument("experiment", nargs="?", metavar="EXPERIMENT",
                   help="sparsedrop, gyro, depth or sliceout (--list describes them)")
    r.add_argument("--list", action="store_true", help="describe the experiments and exit")
    r.add_argument("--quick", action="store_true", help="a tiny grid on the CPU in under two "
                   "minutes, on stand-in data (digits, a synthetic text): a smoke test")
    r.add_argument("--seeds", type=int, metavar="N", help="seeds per config (overrides the "
                   "paper's count)")
    r.add_argument("--out", metavar="DIR", help="results folder [repro-results/EXPERIMENT, "
                   "with -quick for --quick]")
    r.add_argument("--device", choices=("auto", "cpu", "gpu"),
                   help="auto: the GPU when CuPy sees one [auto; cpu with --quick]")
    r.add_argument("--no-progress", action="store_true", help="no progress bar; one line per "
                   "finished run")
    r.add_argument("--report-only", action="store_true", help="train nothing: write the "
                   "report of the runs already in --out (an unfinished grid's says what is "
                   "missing)")
    n = sub.add_parser("launch", help="run a command as N data-parallel ranks on this host",
                       usage="cudrop launch -n N [--port P] -- COMMAND ...",
                       description="Start N processes of COMMAND with RANK, WORLD_SIZE, "
                       "LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (as torchrun does). COMMAND "
                       "is a cudrop command (train ...), a Python script or a program. Signals "
                       "are forwarded; when a rank fails the others are stopped and the "
                       "launcher exits with its status.")
    n.add_argument("-n", "--nproc", type=int, required=True, metavar="N",
                   help="number of ranks (one per GPU)")
    n.add_argument("--port", type=int, metavar="P", help="MASTER_PORT [a free port]")
    n.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="after --: what each rank runs, e.g. train --model mlp")
    return p


def cmd_info(_args):
    from . import __version__, backend
    info = backend.info()
    rows = [("cudrop", __version__), ("numpy", info["numpy"]),
            ("cupy", info["cupy"] or "not installed"), ("backend", info["backend"]),
            ("gpu", info["gpu"] or "none")]
    if info["cupy"]:  # the CUDA facts mean nothing without CuPy
        from .raw_kernels import cache_dir
        rows += [("cuda", info["cuda"] or "-"), ("kernel cache", cache_dir())]
    for k, v in rows:
        print(f"{k:13s} {v}")
    return 0


# ---- cudrop train: flags -> a checked config -------------------------------------------------

def _flag(name):
    return "--" + name.replace("_", "-")


def _check_writable(flag, path):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{flag}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{flag}: directory {directory!r} is not writable")
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path!r} is a directory; give a file name")


def _run_config(args):
    """The run's settings: per-model defaults, then the checkpoint's (with --resume), then the
    flags given; every value checked and every inapplicable flag refused, naming the flag."""
    given = {k: getattr(args, k) for k in RUN_FLAGS if getattr(args, k) is not None}
    if args.resume:
        from .checkpoint import read_meta
        if not os.path.isfile(args.resume):
            raise UsageError(f"--resume: no checkpoint at {args.resume!r}")
        try:
            saved = read_meta(args.resume)["state"].get("config")
        except (ValueError, OSError) as e:
            raise UsageError(f"--resume: {e}")
        if not saved:
            raise UsageError(f"--resume: {args.resume!r} was not written by cudrop train")
        clash = {k: v for k, v in given.items() if saved.get(k) != v}
        if clash:
            raise UsageError("--resume: " + "; ".join(
                f"{_flag(k)} {v} differs from the checkpoint's {saved.get(k)}"
                for k, v in clash.items()) + " (a resumed run keeps its flags)")
        return dict(saved)
    cfg = dict(GLOBAL_DEFAULTS)
    cfg.update(given)
    cfg = dict(DEFAULTS[cfg["model"]], **cfg)
    model = cfg["model"]
    cfg.setdefault("data", "shakespeare" if model == "gpt" else "digits")
    if (model == "gpt") != (cfg["data"] == "shakespeare"):
        raise UsageError(f"--model {model} does not fit --data {cfg['data']} (gpt trains on "
                         f"shakespeare; the others on {', '.join(IMAGE_DATA)})")
    cfg.setdefault("steps_per_epoch", 200 if model == "gpt" else None)

    from .nn import make_dropout
    from .philox import check_prob
    if cfg["dropout"] == "none" and "p" in given:
        raise UsageError("--p applies to a dropout variant; --dropout none drops nothing")
    try:
        make_dropout(cfg["dropout"], cfg["p"])
    except ValueError as e:
        raise UsageError(f"--p: {e}")
    for k in ("depth_dropout", "stochastic_depth"):
        try:
            check_prob(cfg[k], _flag(k))
        except ValueError as e:
            raise UsageError(str(e))
    resnet = model.startswith("resnet")
    for k in ("depth_dropout", "stochastic_depth", "stochastic_depth_mode", "drop_downsampling"):
        if k in given and not resnet:
            raise UsageError(f"{_flag(k)} applies to --model resnet20/resnet56, not {model}")
    if cfg["depth_dropout"] and cfg["stochastic_depth"]:
        raise UsageError("--depth-dropout and --stochastic-depth are alternatives; give one")
    if "stochastic_depth_mode" in given and not cfg["stochastic_depth"]:
        raise UsageError("--stochastic-depth-mode needs --stochastic-depth above 0")
    if "drop_downsampling" in given and not (cfg["depth_dropout"] or cfg["stochastic_depth"]):
        raise UsageError("--drop-downsampling needs --depth-dropout or --stochastic-depth")
    for k in ("epochs", "batch_size", "lr", "steps_per_epoch"):
        if cfg[k] is not None and cfg[k] <= 0:
            raise UsageError(f"{_flag(k)} must be positive, got {cfg[k]}")
    if cfg["warmup"] < 0:
        raise UsageError(f"--warmup must be >= 0, got {cfg['warmup']}")
    if not 0 <= cfg["seed"] < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32), got {cfg['seed']}")
    return cfg


def _check_paths(args):
    if args.save_every is not None:
        if not args.save:
            raise UsageError("--save-every needs --save PATH")
        if args.save_every <= 0:
            raise UsageError(f"--save-every must be positive, got {args.save_every}")
    for flag, path in (("--json", args.json), ("--save", args.save)):
        if path:
            _check_writable(flag, path)


def _build(cfg, ds):
    from . import models
    kw = dict(dropout=cfg["dropout"], p=cfg["p"], seed=cfg["seed"])
    if cfg["model"] == "gpt":
        return models.GPT(len(ds.vocab), **kw)
    if cfg["model"] == "mlp":
        return models.mlp(ds.input_shape, ds.num_classes, **kw)
    if cfg["model"] == "vit":
        c, h, _ = ds.input_shape
        # Few, large patches learn fastest on these small images: 8x8 -> 4 tokens, 28x28 -> 16.
        return models.ViT(image_size=h, patch_size=4 if h <= 16 else 7, in_channels=c,
                          num_classes=ds.num_classes, **kw)
    return models.ResNet(int(cfg["model"][6:]), num_classes=ds.num_classes,
                         in_channels=ds.input_shape[0], depth_dropout=cfg["depth_dropout"],
                         stochastic_depth=cfg["stochastic_depth"],
                         stochastic_depth_mode=cfg["stochastic_depth_mode"],
                         keep_downsampling=not cfg["drop_downsampling"], **kw)


def _optimizer(cfg, params, total):
    from . import optim
    lr = cfg["lr"]
    opt = {"sgd": lambda: optim.SGD(params, lr, momentum=0.9, nesterov=True, weight_decay=5e-4),
           "adam": lambda: optim.Adam(params, lr),
           "adamw": lambda: optim.AdamW(params, lr),
           "rmsprop": lambda: optim.RMSprop(params, lr)}[cfg["optimizer"]]()
    warm = min(cfg["warmup"], total - 1)
    if warm > 0:
        sched = optim.LinearWarmup(opt, warm, after=optim.CosineLR(opt, total_steps=total - warm))
    else:
        sched = optim.CosineLR(opt, total_steps=total)
    return opt, sched


def _resolved_precision(name, device):
    """``--precision`` with ``auto`` resolved: bf16 on a GPU whose tensor cores have it (sm_80+),
    fp32 elsewhere. On the H200 (2026-12-03) every model trained in bf16 (ResNet-20 on digits
    98.6% in 15 epochs, as in fp32) and a captured bf16 ResNet-56 step took 7.9 ms against
    fp32's 12.5 (benchmarks/RESULTS.md). The resolved name is what the run records, so a
    resumed run keeps its precision wherever it resumes."""
    if name != "auto":
        return name
    if device == "gpu":
        from . import backend
        if int(backend.cupy.cuda.Device().compute_capability) >= 80:
            return "bf16"
    return "fp32"


def _precision(name, device):
    """The parameter dtype of ``--precision`` (resolved) on ``device`` (tf32 also switches the
    float32 GEMMs to TF32 tensor cores, through CuPy's own switch)."""
    if name == "bf16":
        if device != "gpu":
            raise UsageError("--precision bf16 needs --device gpu (NumPy has no bfloat16 math)")
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    if name == "tf32":
        os.environ["CUPY_TF32"] = "1"
    if name == "fp16":
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def _join(args):
    """``(rank, world_size)``: a launcher's job of several ranks is joined (NCCL, GPU
    ``LOCAL_RANK``); a single process needs nothing."""
    from . import distributed as dist
    try:
        env = dist.read_env()
    except ValueError as e:
        raise UsageError(f"the launcher's variables: {e}")
    if env.world_size == 1:
        return 0, 1
    if args.device == "cpu":
        raise UsageError(f"--device cpu: this is rank {env.rank} of {env.world_size}, and "
                         "data-parallel training runs over NCCL on GPUs (--device gpu)")
    try:
        dist.init()
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"rank {env.rank} of {env.world_size}: {e}")
    return env.rank, env.world_size


def cmd_train(args):
    from . import backend
    from . import distributed as dist

    cfg = _run_config(args)
    _check_paths(args)
    rank, world = _join(args)
    try:
        device = backend.resolve_device("gpu" if world > 1 else args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}")
    try:
        return _train(args, cfg, device, rank, world)
    except dist.DistributedError as e:
        print(f"cudrop train: {e}", file=sys.stderr)
        return 1
    finally:
        dist.destroy()


def _use_graph(flag, device, world):
    """--graph: on by default on one GPU (a data-parallel step's captured all-reduce has not
    run on several GPUs yet); an error on the CPU."""
    if flag and device != "gpu":
        raise UsageError("--graph needs the GPU (CUDA graphs); drop it or use --device gpu")
    if flag and world > 1:
        import warnings
        warnings.warn("--graph with several ranks: a captured step's all-reduce has not run on "
                      "several GPUs yet", RuntimeWarning, stacklevel=2)
    return device == "gpu" and world == 1 if flag is None else flag


def _train(args, cfg, device, rank, world):
    from . import distributed as dist
    from .checkpoint import write_atomically
    from .nn import set_shard, set_total_steps
    from .train import ClassifierTask, LanguageTask, NonFiniteLoss, Trainer
    from ._checks import IndexRangeError

    def say(*a, **k):
        if rank == 0:
            print(*a, **k)

    cfg["precision"] = _resolved_precision(cfg["precision"], device)
    dtype = _precision(cfg["precision"], device)
    from . import data as D
    loader = {"digits": D.load_digits, "mnist": D.load_mnist, "fashion": D.load_fashion_mnist,
              "shakespeare": D.load_shakespeare}[cfg["data"]]
    try:
        ds = loader()
    except D.DatasetNotFound as e:
        raise UsageError(f"--data {cfg['data']}: {e}")

    model = _build(cfg, ds).to(device, dtype=dtype)
    shard = dict(rank=rank, world_size=world)
    if cfg["model"] == "gpt":
        task = LanguageTask(ds, cfg["batch_size"], device, model.block_size,
                            cfg["steps_per_epoch"], **shard)
    else:
        task = ClassifierTask(ds, cfg["batch_size"], device, cfg["steps_per_epoch"], dtype=dtype,
                              **shard)
    total = cfg["epochs"] * task.steps_per_epoch
    opt, schedule = _optimizer(cfg, model.parameters(), total)
    set_total_steps(model, total)  # gyro: each sub-network runs once over the run
    reducer = None
    if world > 1:
        set_shard(model, rank, world)       # per-row masks: this rank's rows of the global batch
        dist.broadcast_parameters(model)    # every rank starts from rank 0's weights
        reducer = dist.GradientReducer(model.parameters())
    from .optim import LossScaler
    trainer = Trainer(model, opt, task, schedule=schedule, seed=cfg["seed"],
                      progress=not args.no_progress and rank == 0,
                      log=say, save=args.save or args.resume,
                      save_every=args.save_every, config=cfg, reducer=reducer,
                      scaler=LossScaler() if dtype == np.float16 else None,
                      capture=_use_graph(args.graph, device, world))
    if args.resume:
        from .checkpoint import CheckpointError
        try:
            trainer.resume(args.resume)
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}")

    depth = (f", depth dropout {cfg['depth_dropout']}" if cfg["depth_dropout"] else
             f", stochastic depth {cfg['stochastic_depth']} ({cfg['stochastic_depth_mode']})"
             if cfg["stochastic_depth"] else "")
    at = f", resumed at step {trainer.step}" if args.resume else ""
    ranks = f" x {world} ranks (global batch {cfg['batch_size'] * world})" if world > 1 else ""
    say(f"training {cfg['model']} on {cfg['data']} ({device}, {np.dtype(dtype).name}), "
        f"dropout={cfg['dropout']} "
        f"p={cfg['p']}{depth}, {model.num_parameters():,} parameters, {cfg['optimizer']} "
        f"lr={cfg['lr']}, batch {cfg['batch_size']}{ranks}, {cfg['epochs']} epochs of "
        f"{task.steps_per_epoch} steps{at}", flush=True)
    t0 = time.perf_counter()
    try:
        hist, final = trainer.fit(cfg["epochs"])
    except (NonFiniteLoss, IndexRangeError) as e:  # a diverged run, or a bad label in the data
        saved = f"; the last checkpoint at {trainer.save_path} is intact" if trainer.save_path else ""
        who = f"rank {rank}: " if world > 1 else ""
        print(f"cudrop train: stopped: {who}{e}{saved}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    step_ms = float(np.mean([r["step_time_ms"] for r in hist.epochs]))
    metric = (f"test acc {final['test_acc']:.4f}" if "test_acc" in final
              else f"test loss {final['test_loss']:.4f}")
    say(f"done: {cfg['model']} on {cfg['data']}, {metric}, {cfg['epochs']} epochs in "
        f"{wall:.1f} s, mean step {step_ms:.2f} ms")
    if args.json and rank == 0:
        out = dict(config=dict(cfg, device=device, world_size=world), epochs=hist.epochs,
                   final=dict(final, wall_s=wall, mean_step_ms=step_ms))
        write_atomically(args.json, lambda f: json.dump(out, f, indent=2))
    return 0


def cmd_repro(args):
    from . import repro
    if args.list:
        print(repro.describe())
        return 0
    if args.experiment is None:
        raise UsageError("give an EXPERIMENT (" + ", ".join(repro.EXPERIMENTS)
                         + ") or --list")
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be a positive integer, got {args.seeds}")
    device = args.device or ("cpu" if args.quick else "auto")
    command = "cudrop repro " + " ".join(
        [args.experiment] + (["--quick"] if args.quick else [])
        + ([f"--seeds {args.seeds}"] if args.seeds else [])
        + ([f"--device {args.device}"] if args.device else [])
        + ([f"--out {args.out}"] if args.out else []))
    try:
        res = repro.run(args.experiment, quick=args.quick, seeds=args.seeds, out=args.out,
                        device=device, progress=not args.no_progress, command=command,
                        report_only=args.report_only)
    except repro.ReproError as e:
        raise UsageError(str(e))
    print(f"{res['ran']} run(s) done, {res['skipped']} skipped (already in {res['out']}); "
          f"report: {res['report']}")
    return 0


def cmd_launch(args):
    from .distributed import launch
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("give the command each rank runs after --, e.g. "
                         "cudrop launch -n 2 -- train --model mlp")
    try:
        return launch(args.nproc, command, port=args.port)
    except ValueError as e:
        raise UsageError(str(e).removeprefix("cudrop launch: "))


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"info": cmd_info, "train": cmd_train, "repro": cmd_repro,
                "launch": cmd_launch}[args.command](args)
    except UsageError as e:
        print(f"cudrop {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
