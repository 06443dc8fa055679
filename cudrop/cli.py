"""The ``cudrop`` command: ``cudrop info`` and ``cudrop train``."""
from __future__ import annotations

import argparse
import json
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


def _parser():
    from .nn import DROPOUT_KINDS
    p = argparse.ArgumentParser(prog="cudrop", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backend, GPU and kernel cache")
    t = sub.add_parser("train", help="train a model on a real data set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", choices=MODELS, default="mlp")
    t.add_argument("--data", choices=DATASETS, default=None,
                   help="default: digits, or shakespeare for --model gpt")
    t.add_argument("--dropout", choices=DROPOUT_KINDS, default="dropout",
                   help="variant that drops hidden units (see README)")
    t.add_argument("--p", type=float, default=0.1, help="drop probability, in [0, 1)")
    t.add_argument("--depth-dropout", type=float, default=0.0, metavar="P",
                   help="ResNets: drop each residual branch with probability P (Guo & Gould; "
                        "trainable 1x1 shortcuts)")
    t.add_argument("--stochastic-depth", type=float, default=0.0, metavar="P_L",
                   help="ResNets: stochastic depth, last unit dropped with probability P_L")
    t.add_argument("--stochastic-depth-mode", choices=("batch", "sample"), default="batch")
    t.add_argument("--drop-downsampling", action="store_true",
                   help="ResNets: let depth variants drop the stride-2 units too")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--optimizer", choices=("sgd", "adam", "adamw", "rmsprop"), default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    t.add_argument("--steps-per-epoch", type=int, default=200, help="text models only")
    t.add_argument("--json", metavar="PATH", help="write config and metrics as JSON")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cmd_info(_args):
    from . import __version__, backend
    from .raw_kernels import cache_dir
    info = backend.info()
    rows = [("cudrop", __version__), ("numpy", info["numpy"]), ("cupy", info["cupy"] or "not installed"),
            ("backend", info["backend"]), ("gpu", info["gpu"] or "none"),
            ("cuda", info["cuda"] or "-"), ("kernel cache", cache_dir())]
    for k, v in rows:
        print(f"{k:13s} {v}")
    return 0


def _check_positive(name, v):
    if v is not None and v <= 0:
        raise SystemExit(f"cudrop train: error: {name} must be positive, got {v}")


def cmd_train(args):
    from . import backend, models, optim
    from .nn import make_dropout, set_total_steps

    data_name = args.data or ("shakespeare" if args.model == "gpt" else "digits")
    if (args.model == "gpt") != (data_name == "shakespeare"):
        raise SystemExit(f"cudrop train: error: --model {args.model} does not fit --data "
                         f"{data_name} (gpt trains on shakespeare; the others on "
                         f"{', '.join(IMAGE_DATA)})")
    try:
        make_dropout(args.dropout, args.p)
    except ValueError as e:
        raise SystemExit(f"cudrop train: error: --p: {e}")
    depth_flags = args.depth_dropout or args.stochastic_depth
    if depth_flags and not args.model.startswith("resnet"):
        raise SystemExit("cudrop train: error: --depth-dropout and --stochastic-depth apply to "
                         f"--model resnet20/resnet56, not {args.model}")
    cfg = dict(DEFAULTS[args.model])
    for k in ("epochs", "batch_size", "lr", "optimizer"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    for k in ("epochs", "batch_size", "lr"):
        _check_positive("--" + k.replace("_", "-"), cfg[k])
    _check_positive("--steps-per-epoch", args.steps_per_epoch)
    if not 0 <= args.seed < 2 ** 32:
        raise SystemExit(f"cudrop train: error: --seed must be in [0, 2**32), got {args.seed}")
    try:
        device = backend.resolve_device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"cudrop train: error: --device gpu: {e}")

    from . import data as D
    loader = {"digits": D.load_digits, "mnist": D.load_mnist, "fashion": D.load_fashion_mnist,
              "shakespeare": D.load_shakespeare}[data_name]
    try:
        ds = loader()
    except D.DatasetNotFound as e:
        raise SystemExit(f"cudrop train: error: {e}")

    kw = dict(dropout=args.dropout, p=args.p, seed=args.seed)
    if args.model == "gpt":
        model = models.GPT(len(ds.vocab), **kw)
    elif args.model == "mlp":
        model = models.mlp(ds.input_shape, ds.num_classes, **kw)
    elif args.model == "vit":
        c, h, _ = ds.input_shape
        # Few, large patches learn fastest on these small images: 8x8 -> 4 tokens, 28x28 -> 16.
        model = models.ViT(image_size=h, patch_size=4 if h <= 16 else 7, in_channels=c,
                           num_classes=ds.num_classes, **kw)
    else:
        try:
            model = models.ResNet(int(args.model[6:]), num_classes=ds.num_classes,
                                  in_channels=ds.input_shape[0], depth_dropout=args.depth_dropout,
                                  stochastic_depth=args.stochastic_depth,
                                  stochastic_depth_mode=args.stochastic_depth_mode,
                                  keep_downsampling=not args.drop_downsampling, **kw)
        except ValueError as e:
            raise SystemExit(f"cudrop train: error: {e}")
    model.to(device)

    params = model.parameters()
    opt = {"sgd": lambda: optim.SGD(params, cfg["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4),
           "adam": lambda: optim.Adam(params, cfg["lr"]),
           "adamw": lambda: optim.AdamW(params, cfg["lr"]),
           "rmsprop": lambda: optim.RMSprop(params, cfg["lr"])}[cfg["optimizer"]]()
    if args.model == "gpt":
        total = cfg["epochs"] * args.steps_per_epoch
    else:
        total = cfg["epochs"] * D.num_batches(len(ds.x_train), cfg["batch_size"])
    schedule = optim.CosineLR(opt, total_steps=total)
    set_total_steps(model, total)  # gyro: each sub-network runs once over the run

    depth = (f", depth dropout {args.depth_dropout}" if args.depth_dropout else
             f", stochastic depth {args.stochastic_depth} ({args.stochastic_depth_mode})"
             if args.stochastic_depth else "")
    print(f"training {args.model} on {data_name} ({device}), dropout={args.dropout} p={args.p}{depth}, "
          f"{model.num_parameters():,} parameters, {cfg['optimizer']} lr={cfg['lr']}, "
          f"batch {cfg['batch_size']}, {cfg['epochs']} epochs", flush=True)
    from .train import fit_classifier, fit_lm
    t0 = time.perf_counter()
    common = dict(epochs=cfg["epochs"], batch_size=cfg["batch_size"], device=device,
                  seed=args.seed, schedule=schedule, progress=not args.no_progress)
    if args.model == "gpt":
        hist, final = fit_lm(model, ds, opt, steps_per_epoch=args.steps_per_epoch, **common)
    else:
        hist, final = fit_classifier(model, ds, opt, **common)
    wall = time.perf_counter() - t0
    step_ms = float(np.mean([r["step_time_ms"] for r in hist.epochs]))
    metric = (f"test acc {final['test_acc']:.4f}" if "test_acc" in final
              else f"test loss {final['test_loss']:.4f}")
    print(f"done: {args.model} on {data_name}, {metric}, {cfg['epochs']} epochs in {wall:.1f} s, "
          f"mean step {step_ms:.2f} ms")
    if args.json:
        out = dict(config=dict(vars(args), data=data_name, device=device, **cfg),
                   epochs=hist.epochs, final=dict(final, wall_s=wall, mean_step_ms=step_ms))
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    return {"info": cmd_info, "train": cmd_train}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
