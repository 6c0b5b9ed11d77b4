"""`twinflow eval ...` and `twinflow judges train|accuracy|train-ae|check-ae ...` (mounted by twinflow/cli.py).

Heavy modules (torch, Ray, diffusers) are imported inside the handlers so `twinflow --help` stays instant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from twinflow.config import ConfigError


def _eval(args: argparse.Namespace) -> int:
    from twinflow.eval.edits import eval_command
    from twinflow.eval.job import EvalInputError, EvalRequest, run_eval

    try:  # image editors (exports declaring the "edit" task) are scored on held-out edit pairs
        report = eval_command(args)
    except EvalInputError as exc:
        raise ConfigError(f"twinflow eval: {exc}") from None
    if report is not None:
        return _print_report(report)
    try:
        req = EvalRequest(
            checkpoints=args.checkpoints,
            dataset=args.dataset,
            nfe=args.nfe,
            sampler=args.sampler,
            samples_per_class=args.samples_per_class,
            classes=args.classes,
            actors=args.actors,
            actor_cpus=args.actor_cpus,
            batch_size=args.batch_size,
            seed=args.seed,
            out_dir=args.out,
            grid_per_class=args.grid_per_class,
            s3_endpoint=args.s3_endpoint,
            edits=args.edits,
            reference=args.reference,
            edit_limit=args.edit_limit,
            address=args.address,
            device=args.device,
        )
    except ValueError as exc:  # pydantic ValidationError is a ValueError
        raise ConfigError(f"twinflow eval: {_short(exc)}") from None
    try:
        report = run_eval(req)
    except EvalInputError as exc:
        raise ConfigError(f"twinflow eval: {exc}") from None
    return _print_report(report)


def _print_report(report: dict) -> int:
    print(report["markdown"])
    print(f"[twinflow eval] results: {report['files']['json']}, {report['files']['markdown']}")
    for g in report["files"].get("grids", []):
        print(f"[twinflow eval] grid: {g}")
    return 0


def _short(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in errors())
    return str(exc)


def _judges_train(args: argparse.Namespace) -> int:
    from twinflow.eval.judges import train_judge

    path, meta = train_judge(
        args.dataset,
        out=Path(args.out) if args.out else None,
        seed=args.seed,
        epochs=args.epochs,
        threads=args.threads,
    )
    print(
        f"[twinflow judges] wrote {path} ({path.stat().st_size / 1024:.0f} KiB); held-out {meta['heldout']}"
    )
    return 0


def _judges_accuracy(args: argparse.Namespace) -> int:
    from twinflow.eval.judges import heldout_metrics, load_judge

    out = {}
    for name in args.datasets:
        judge = load_judge(name)
        measured = heldout_metrics(judge)
        out[judge.name] = {
            "measured": measured,
            "shipped": judge.meta.get("heldout"),
            "weights": judge.meta["path"],
            "sha256": judge.meta["sha256"][:16],
        }
    print(json.dumps(out, indent=2))
    return 0


def _judges_train_ae(args: argparse.Namespace) -> int:
    from twinflow.eval.autoencoder_space import train_feature_space

    path, meta = train_feature_space(
        args.dataset,
        out=Path(args.out) if args.out else None,
        seed=args.seed,
        steps=args.steps,
        threads=args.threads,
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(
        f"[twinflow judges] wrote {path} ({path.stat().st_size / 1024:.0f} KiB, sha256 {digest}); "
        f"held-out {json.dumps(meta['heldout'])}"
    )
    return 0


def _judges_check_ae(args: argparse.Namespace) -> int:
    from twinflow.eval.autoencoder_space import heldout_metrics, load_feature_space

    out = {}
    for name in args.datasets:
        space = load_feature_space(name)  # refuses a shipped file whose hash is not the pinned one
        out[space.name] = {
            "measured": heldout_metrics(space, seed=int(space.meta.get("seed", 0))),
            "shipped": space.meta.get("heldout"),
            "weights": space.meta["path"],
            "sha256": space.meta["sha256"][:16],
        }
    print(json.dumps(out, indent=2))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score checkpoints per NFE: adherence, Fréchet distance, diversity (Ray Data sampling)",
        description="Sample each checkpoint at each NFE on a Ray Data actor pool, judge the images, "
        "and write results.json, results.md and sample grids.",
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="export directories (runs/<job>/export, or the run dir runs/<job>), local or s3://",
    )
    p.add_argument("--nfe", default="1,2,4", help="comma-separated NFE list (default 1,2,4)")
    p.add_argument(
        "--dataset",
        default=None,
        help="fashion_mnist | mnist | emoji (default: inferred from the run's job.json)",
    )
    p.add_argument(
        "--sampler",
        default="auto",
        choices=["auto", "few", "ode"],
        help="few = TwinFlow presets, ode = Euler steps at r=t; auto: ode for flow-matching exports",
    )
    p.add_argument("--samples-per-class", type=int, default=100)
    p.add_argument("--classes", default=None, help="comma-separated class indices (default: all)")
    p.add_argument("--actors", type=int, default=1, help="sampling actors (Ray Data actor pool size)")
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=100, help="images per sampling unit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-per-class", type=int, default=6, help="images per class in the PNG grids")
    p.add_argument("--out", default="outputs/eval", help="output folder (default outputs/eval)")
    p.add_argument("--edits", default=None, help="edit-pair shards (e.g. data/mnist_edits): also score edits")
    p.add_argument(
        "--reference",
        default=None,
        help="shards whose eval/train splits are the real images (default: each run's data.path)",
    )
    p.add_argument("--edit-limit", type=int, default=256, help="edit pairs scored per checkpoint")
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--address", default=None, help="Ray address (default: a local cluster)")
    p.add_argument("--device", default="cpu", help="device inside the sampling actors (cpu, cuda)")
    p.set_defaults(func=_eval)

    j = sub.add_parser(
        "judges",
        help="train or check the judge classifiers and the autoencoder feature space used by `twinflow eval`",
    )
    jsub = j.add_subparsers(dest="judges_command", required=True)
    t = jsub.add_parser("train", help="train a judge on the dataset's train split and save its weights")
    t.add_argument("dataset", help="fashion_mnist | mnist | emoji")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument(
        "--out",
        default=None,
        help="weights file (default: the shipped platform/twinflow/eval/weights/<dataset>.safetensors)",
    )
    t.set_defaults(func=_judges_train)
    a = jsub.add_parser("accuracy", help="measure the shipped judges on their held-out splits")
    a.add_argument("datasets", nargs="*", default=["fashion_mnist", "mnist"])
    a.set_defaults(func=_judges_accuracy)
    ae = jsub.add_parser(
        "train-ae",
        help="train the second feature space (a convolutional autoencoder, no labels) on a train split",
    )
    ae.add_argument("dataset", help="fashion_mnist | mnist")
    ae.add_argument("--seed", type=int, default=0)
    ae.add_argument("--steps", type=int, default=None)
    ae.add_argument("--threads", type=int, default=1)
    ae.add_argument(
        "--out",
        default=None,
        help="weights file (default: the shipped platform/twinflow/eval/weights/ae_<dataset>.safetensors)",
    )
    ae.set_defaults(func=_judges_train_ae)
    c = jsub.add_parser(
        "check-ae", help="verify the shipped autoencoders and re-measure their held-out figures"
    )
    c.add_argument("datasets", nargs="*", default=["fashion_mnist", "mnist"])
    c.set_defaults(func=_judges_check_ae)


if __name__ == "__main__":  # python -m twinflow.eval.cli ...
    parser = argparse.ArgumentParser(prog="twinflow")
    add_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
