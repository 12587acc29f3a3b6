"""``lcc layers MODEL``: print each submodule's name and output shape, to choose ``--layers``.

The input shape and class count come from ``--dataset`` (presets need no download) or
from ``--input-shape`` / ``--num-classes``. One line per submodule that runs on a sample:
name, per-sample output shape, the latent dimension recorded with ``--pool``, and the
submodule's parameter count.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lcc.errors import LCCInputError

if TYPE_CHECKING:
    import torch

HELP = "list a model's submodules with their output shapes (names for --layers)"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from lcc.cli import add_command
    from lcc.cli.flags import MODEL_HELP, NO_PRETRAINED_HELP
    from lcc.engine.choices import POOLS  # torch-free: --help stays fast

    parser = add_command(subparsers, "layers", HELP, (__doc__ or "").strip().replace("``", ""), run)
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="dataset giving the input shape and number of classes (presets are not loaded)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=argparse.SUPPRESS,
        help="number of classes (default: the dataset's)",
    )
    parser.add_argument(
        "--input-shape",
        default=argparse.SUPPRESS,
        help="input shape C,H,W (default: the dataset's)",
    )
    parser.add_argument(
        "--pool",
        choices=POOLS,
        default="flatten",
        help="pooling used for the DIM column (as lcc train --pool)",
    )
    parser.add_argument("--no-pretrained", action="store_true", help=NO_PRETRAINED_HELP)
    parser.add_argument("--checkpoint", help="load these saved weights first")
    parser.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="dataset root (default: $LCC_DATA_DIR, else ~/.cache/lcc/data)",
    )
    return parser


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse ``C,H,W`` (or ``CxHxW``).

    >>> parse_shape("1,28,28")
    (1, 28, 28)
    """
    parts = [p for p in re.split(r"[,x× ]+", text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise LCCInputError(f"--input-shape must be C,H,W positive integers, got {text!r}")
    return shape  # type: ignore[return-value]


def resolve_shape(
    dataset: str, input_shape: str | None, num_classes: int | None, data_dir: str | None = None
) -> tuple[tuple[int, int, int], int]:
    """(input_shape, num_classes) from the options, loading the dataset only if needed."""
    from lcc.zoo.datasets import dataset_info, load_dataset

    shape = parse_shape(input_shape) if input_shape else None
    if shape is None or num_classes is None:
        info = dataset_info(dataset)
        if info is None:
            bundle = load_dataset(dataset, root=data_dir, augment=False)
            info = (bundle.input_shape, bundle.num_classes)
        shape = shape or info[0]
        num_classes = num_classes if num_classes is not None else info[1]
    if num_classes < 1:
        raise LCCInputError(f"--num-classes must be positive, got {num_classes}")
    return shape, num_classes


def layer_table(
    model: torch.nn.Module, input_shape: Sequence[int], *, pool: str = "flatten"
) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, output shape, pooled dimension, parameter count) for each submodule.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    >>> layer_table(net, (1, 4, 4), pool="avg")
    [('0', (2, 2, 2), 2, 20), ('1', (8,), 8, 0)]
    """
    import torch

    from lcc.zoo.latents import list_layers, pool_output

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, *input_shape, generator=generator)
    rows = []
    for name, shape in list_layers(model, sample):
        dim = pool_output(torch.zeros(1, *shape), pool).shape[1]  # type: ignore[arg-type]
        params = sum(p.numel() for p in model.get_submodule(name).parameters())
        rows.append((name, shape, int(dim), int(params)))
    return rows


def format_table(rows: Sequence[tuple[str, tuple[int, ...], int, int]]) -> str:
    shapes = ["x".join(map(str, shape)) or "scalar" for _, shape, _, _ in rows]
    width = max([5, *(len(name) for name, *_ in rows)])
    shape_width = max([12, *map(len, shapes)])
    lines = [f"{'LAYER':<{width}}  {'OUTPUT SHAPE':<{shape_width}}  {'DIM':>8}  {'PARAMS':>10}"]
    for (name, _, dim, params), shape in zip(rows, shapes, strict=True):
        lines.append(f"{name:<{width}}  {shape:<{shape_width}}  {dim:>8}  {params:>10}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from lcc.zoo.models import build_model

    shape, num_classes = resolve_shape(
        args.dataset,
        getattr(args, "input_shape", None),
        getattr(args, "num_classes", None),
        getattr(args, "data_dir", None),
    )
    torch.manual_seed(0)
    model = build_model(
        args.model,
        num_classes,
        input_shape=shape,
        pretrained=not args.no_pretrained,
        checkpoint=args.checkpoint,
    )
    rows = layer_table(model, shape, pool=args.pool)
    size = "x".join(map(str, shape))
    print(f"# {args.model}: input {size}, {num_classes} classes, pool={args.pool}")
    print(format_table(rows))
    return 0
