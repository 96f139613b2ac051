"""``dinoscope weights inspect PATH`` and ``dinoscope weights convert PATH OUT``."""

from __future__ import annotations

import argparse
import json

from core.errors import DinoscopeError


def _csv_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=["dinoscope", "dinov2_hub", "dinov2_train", "cell_dino", "hrch"],
        help="checkpoint family (detected from the keys by default)",
    )
    p.add_argument(
        "--branch", default="teacher", choices=["teacher", "student"], help="which network of a training checkpoint"
    )
    p.add_argument("--num-heads", type=int, help="attention heads, for widths that are not a multiple of 64")
    p.add_argument("--in-chans", type=int, help="adapt the patch embedding to this many input channels")
    p.add_argument("--channel-strategy", default="repeat", choices=["repeat", "mean", "zero"])
    p.add_argument("--channel-names", type=lambda s: s.split(","), help="comma-separated channel names")
    p.add_argument("--mean", type=_csv_floats, help="comma-separated per-channel means (inputs in [0,1])")
    p.add_argument("--std", type=_csv_floats, help="comma-separated per-channel stds")


def _load(args: argparse.Namespace):  # noqa: ANN202
    from core.weights import load_backbone

    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    return load_backbone(
        args.path,
        format=args.format,
        branch=args.branch,
        in_chans=args.in_chans,
        channel_strategy=args.channel_strategy,
        channel_names=args.channel_names,
        mean=args.mean,
        std=args.std,
        **overrides,
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    model, meta = _load(args)
    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "path": str(args.path),
        "format": meta.source_format,
        "arch": meta.arch,
        "patch_size": meta.patch_size,
        "embed_dim": meta.embed_dim,
        "depth": model.n_blocks,
        "num_heads": model.num_heads,
        "in_chans": meta.in_chans,
        "num_register_tokens": meta.num_register_tokens,
        "channel_adaptive": meta.channel_adaptive,
        "channel_names": meta.channel_names,
        "mean": meta.mean,
        "std": meta.std,
        "format_version": meta.format_version,
        "parameters": n_params,
        "tensors": len(model.state_dict()),
        "model_kwargs": meta.model_kwargs,
        "extra": meta.extra,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key == "parameters":
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from core.weights import save_backbone

    if not str(args.out).endswith(".safetensors"):
        raise DinoscopeError(
            "the output must end in .safetensors",
            path=args.out,
            field="OUT",
            fix="e.g. dinoscope weights convert in.pth out/model.safetensors",
        )
    model, meta = _load(args)
    path = save_backbone(model, meta, args.out)
    print(
        f"wrote {path} and {path.with_suffix('.json')} ({meta.arch}, {meta.in_chans} channels, "
        f"from {meta.source_format})"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    weights = subparsers.add_parser("weights", help="inspect and convert backbone checkpoints")
    sub = weights.add_subparsers(dest="weights_command", metavar="ACTION")
    sub.required = True
    inspect = sub.add_parser("inspect", help="print architecture, channels, normalisation and format of weights")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    _add_load_options(inspect)
    inspect.set_defaults(func=cmd_inspect)
    convert = sub.add_parser("convert", help="write weights in dinoscope's export format (safetensors + JSON)")
    convert.add_argument("path")
    convert.add_argument("out")
    _add_load_options(convert)
    convert.set_defaults(func=cmd_convert)
