"""``dinoscope eval knn|linear WEIGHTS --kind KIND --train k=v ... --val k=v ...``

dinoscope eval knn out/backbone.safetensors --kind image_folder --train root=data/train --val root=data/val
dinoscope eval linear out/backbone.safetensors --kind synthetic_shapes --train n=400 seed=1 --val n=200 seed=2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from core.errors import DinoscopeError


def _params(items: list[str], field: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise DinoscopeError(f"{item!r} is not key=value", field=field, fix="e.g. --train root=data/train")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    out["labelled"] = True
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from core.config.pretrain import DataCfg
    from core.eval.knn import knn_evaluate
    from core.eval.linear import linear_evaluate
    from core.io import write_json
    from core.ssl.build import build_data
    from core.weights import load_backbone

    model, meta = load_backbone(args.weights)
    train_set = build_data(DataCfg(kind=args.kind, params=_params(args.train, "--train")))
    val_set = build_data(DataCfg(kind=args.kind, params=_params(args.val, "--val")))
    common = dict(size=args.size, mean=meta.mean, std=meta.std)
    if args.protocol == "knn":
        ks = [int(k) for k in args.k.split(",")]
        result = knn_evaluate(model, train_set, val_set, ks=ks, **common)
    else:
        result = linear_evaluate(
            model, train_set, val_set, n_last_blocks=args.n_last_blocks, epochs=args.epochs, **common
        )
    result = {"protocol": args.protocol, "weights": str(args.weights), **result}
    if args.out:
        write_json(Path(args.out), result)
    print(json.dumps(result, indent=2, default=str))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="kNN and linear evaluation of frozen backbone features")
    sub = p.add_subparsers(dest="protocol", metavar="PROTOCOL")
    sub.required = True
    for name, helptext in (
        ("knn", "weighted kNN (T=0.07) on class tokens"),
        ("linear", "linear probes on cls + avg-pooled patch tokens, lr grid"),
    ):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("weights")
        q.add_argument("--kind", default="image_folder", help="dataset kind (core.data.DATASET_KINDS or a plugin)")
        q.add_argument("--train", nargs="+", default=[], metavar="KEY=VALUE", help="training-set parameters")
        q.add_argument("--val", nargs="+", default=[], metavar="KEY=VALUE", help="held-out-set parameters")
        q.add_argument("--size", type=int, default=224, help="input side in pixels (multiple of the patch size)")
        q.add_argument("--out", help="write the result JSON here")
        if name == "knn":
            q.add_argument("--k", default="10,20,100,200", help="comma-separated k grid")
        else:
            q.add_argument("--n-last-blocks", type=int, default=1)
            q.add_argument("--epochs", type=int, default=100)
        q.set_defaults(func=cmd_eval)
