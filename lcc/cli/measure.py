"""``lcc measure``: intraclass clustering measures, LCC clusters and label variation per layer.

Reads latents from LATENTS (``.npz`` or ``.safetensors``) or collects them from a model on a
dataset (``--model``, ``--dataset``, ``--layers``), runs the measures of
:data:`lcc.analysis.measures.MEASURES` and prints one JSON line per measure and layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lcc.cli import add_command
from lcc.cli.flags import MODEL_HELP, NO_PRETRAINED_HELP, positive_int
from lcc.errors import LCCInputError
from lcc.io import OutputKind

HELP = "measure intraclass clustering, LCC clusters and label variation per layer"

DESCRIPTION = """\
Measure how a classifier's latent spaces cluster: the intraclass clustering measures c1-c4
(Carbonnelle & De Vleeschouwer, sec. 2), LCC's clusters with the accuracy on correctly
clustered (CC) and misclustered (MC) samples, and the label variation of the latent
geometry graph. stdout gets one JSON line per measure and layer, each with at least
"measure", "value", "higher_is_better", "layer" and "n"; with several layers the c-measures
add a line with "layer": "all", the paper's value over all of them.

measures (--measure, comma-separated):
  c1               neuron subclass selectivity (eq. 1): median over subclasses of the mean
                   of the --top-k most selective neurons; needs superclass labels
  c2               layer subclass silhouette, cosine distances within each superclass (eq. 2);
                   needs superclass labels
  c3               neuron intraclass variance ratio sigma(class) / sigma(dataset) (eq. 3)
  c4               spread of pairwise cosine distances in a class over the whole set (eq. 4),
                   on standardised activations (25% active)
  clusters         k-NN graph clusters matched to classes: value = misclustered fraction, plus
                   accuracy, accuracy_cc, accuracy_mc when predictions are known (scored on
                   the labels they were made for: y_super when they fit its range, else y;
                   "labels" in the line says which)
  label-variation  share of the k-NN latent graph's edge weight that joins two classes (the
                   label variation over the total weight; also in the line: label_variation,
                   label_variation_normalized, k, similarity). Not --normalize, which
                   degree-normalises the graph before measuring
  auto             c1,c2,c3,c4 when superclass labels are given, else c3,c4

LATENTS keys: z (N, ...) for one layer, or z_<LAYER> for several (the layer is named
<LAYER>); y (N,) class labels; optional y_super (N,) superclass labels (then y are the
subclasses for c1 and c2, and c3, c4, clusters and label-variation use y_super, the classes
the model was trained on, as in the paper) and predictions (N,) the model's predicted classes.
Conv feature maps (N, C, H, W) are max-pooled to one value per channel (a neuron is a feature
map). Without LATENTS or --model, a generated example with planted subclasses is measured.

Which layer: c1, c3 and c4 are defined on pre-activations, c2 on activations. Name the
BatchNorm layer before a ReLU (e.g. features.block1.bn of small-cnn), or a linear layer
feeding a ReLU (fc1): c2 applies the ReLU itself (--no-relu: as given), c4 standardises.
`lcc layers MODEL` lists the names.

examples:
  lcc measure                                            # generated example, c1-c4
  lcc measure latents.npz --measure c1,c2,c3,c4 --top-k 30 --superclass-key y_super
  lcc measure latents.npz --measure label-variation --k 10 --similarity cosine
  lcc measure --model small-cnn --dataset digits --layers features.block1.bn fc1 \\
      --checkpoint run/model.pt --measure c3,c4,clusters --subset 1000
"""

#: An existing --save-latents file of this kind is replaced without --force.
SAVED_LATENTS = OutputKind(
    "latents saved by lcc measure --save-latents (z_<LAYER>, y, predictions)",
    lambda path: _saved_latents(path),
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``measure`` subcommand to ``subparsers``."""
    parser = add_command(subparsers, "measure", HELP, DESCRIPTION, run)
    parser.add_argument(
        "latents",
        nargs="?",
        metavar="LATENTS",
        help=".npz or .safetensors file with z or z_<LAYER>, y, optional y_super and "
        "predictions; None: --model, or a generated example",
    )
    parser.add_argument(
        "--measure",
        default="auto",
        metavar="NAMES",
        help="comma-separated measures: c1, c2, c3, c4, clusters, label-variation, auto",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        metavar="LAYER",
        help="with --model: the layers to measure (required); with LATENTS: measure only these "
        "of its layers; None: every layer in LATENTS",
    )
    _measure_options(parser.add_argument_group("measure options"))
    _model_options(
        parser.add_argument_group("collecting latents from a model (instead of LATENTS)")
    )
    return parser


def _measure_options(measures: Any) -> None:
    from lcc.analysis.intraclass import ACTIVE_FRACTION, TOP_LAYERS, TOP_NEURONS

    measures.add_argument(
        "--top-k",
        type=positive_int,
        help=f"c1, c3: neurons averaged per (sub)class (all when fewer, and c1 then warns: its "
        f"value cancels out); None: the paper's k = {TOP_NEURONS}, with --variant authors their "
        "code's k (c1: 1, c3: neurons / classes)",
    )
    measures.add_argument(
        "--top-layers",
        type=positive_int,
        help=f"c2, c4 over several layers: layers averaged per (sub)class (eq. 2, 4); None: "
        f"{TOP_LAYERS} (the paper's ResNets), with --variant authors 1 (their code)",
    )
    measures.add_argument(
        "--variant",
        choices=("paper", "authors"),
        default="paper",
        help="c1-c4 as the paper's text defines them, or as the authors' public measures.py "
        "computes them (Table 1's numbers): dead neurons 0 (c1, c3) or dropped (c4), +1e-7 in "
        "denominators, c4's threshold the min(100 - 1000/D, 75)th percentile and the spread of "
        "the full distance matrix (zero diagonal included), k as above",
    )
    measures.add_argument(
        "--superclass-key",
        metavar="KEY",
        help="key of the superclass labels in LATENTS; None: y_super when present",
    )
    measures.add_argument(
        "--no-relu",
        dest="relu",
        action="store_false",
        default=argparse.SUPPRESS,
        help="c2: measure the latents as given instead of ReLU(latents) (default: ReLU)",
    )
    measures.add_argument(
        "--active",
        type=float,
        default=ACTIVE_FRACTION,
        help="c4: fraction of samples left active by the bias + ReLU of the standardisation",
    )
    _graph_options(measures)


def _graph_options(measures: Any) -> None:
    """Options of the k-NN graph measures (clusters, label-variation)."""
    from lcc.engine.choices import CLUSTER_METHODS  # torch-free: --help stays fast

    measures.add_argument(
        "--k",
        type=positive_int,
        help="neighbours of the k-NN graph measures; None: 5 for clusters (as lcc cluster), "
        "10 for label-variation",
    )
    measures.add_argument(
        "--method",
        choices=CLUSTER_METHODS,
        default="leiden",
        help="clusters: graph clustering method",
    )
    measures.add_argument(
        "--similarity",
        choices=("auto", "cosine", "rbf"),
        default="auto",
        help="label-variation: edge weights; auto: cosine for non-negative latents, else RBF",
    )
    measures.add_argument(
        "--bandwidth",
        type=float,
        help="label-variation: RBF bandwidth h; None: the mean squared pair distance's root",
    )
    measures.add_argument(
        "--normalize",
        action="store_true",
        default=argparse.SUPPRESS,
        help="label-variation: degree-normalise the graph's weights, D^-1/2 A D^-1/2, before "
        "measuring (default: off; the value is a share of the total weight either way)",
    )
    measures.add_argument(
        "--seed", type=int, default=0, help="seed of the clustering, model init and subsets"
    )


def _model_options(model: Any) -> None:
    model.add_argument("--model", help=MODEL_HELP)
    model.add_argument(
        "--dataset",
        help="dataset spec, e.g. digits, fashion-mnist; DATASET:super (mnist, digits, "
        "fashion-mnist, cifar100) for a model trained on superclasses: y = the fine classes "
        "(c1/c2's subclasses), y_super = the superclasses the model predicts",
    )
    model.add_argument(
        "--superclasses",
        metavar="MAP.yaml",
        help="a model trained with lcc train --superclasses MAP.yaml: the same map (fine "
        "class: superclass); y and y_super as with DATASET:super",
    )
    model.add_argument("--checkpoint", help="saved weights to load (None: initial weights)")
    model.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="samples to measure (the paper measures the training data)",
    )
    model.add_argument(
        "--subset",
        type=positive_int,
        metavar="N",
        help="a seeded stratified subset of N samples of the split; None: all",
    )
    model.add_argument(
        "--batch-size", type=positive_int, default=256, help="batch size of the forward passes"
    )
    model.add_argument("--no-pretrained", action="store_true", help=NO_PRETRAINED_HELP)
    model.add_argument("--data-dir", help="dataset root (None: $LCC_DATA_DIR, else ~/.cache/lcc)")
    model.add_argument(
        "--save-latents",
        metavar="OUT.npz",
        help="also write the collected latents (z_<LAYER>, y, predictions) to this .npz, e.g. "
        "to add y_super for c1 and c2",
    )
    model.add_argument(
        "--force",
        action="store_true",
        help="let --save-latents replace an existing file that is not latents saved by lcc "
        "measure (never the --checkpoint)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``lcc measure`` with parsed ``args``; returns the exit code."""
    from lcc.analysis.measures import read_measure_input, run_measures

    if args.model is not None:
        data = _collect(args)
    else:
        _check_file_args(args)
        if args.latents is None:
            data = example(seed=args.seed)
            _check_example_layers(args.layers, data)
        else:
            data = read_measure_input(args.latents, args.layers, args.superclass_key)
    for line in run_measures(args.measure, data, _options(args)):
        print(json.dumps(line), flush=True)
    return 0


#: the MeasureOptions fields that are flags of the same name
OPTION_NAMES = (
    "top_k",
    "top_layers",
    "k",
    "method",
    "similarity",
    "bandwidth",
    "active",
    "seed",
    "variant",
)


def _options(args: argparse.Namespace) -> Any:
    from lcc.analysis.measures import MeasureOptions

    return MeasureOptions(
        **{name: getattr(args, name) for name in OPTION_NAMES},
        normalize=getattr(args, "normalize", False),
        relu=getattr(args, "relu", True),
    )


def _collect(args: argparse.Namespace) -> Any:
    """Latents of ``args.layers`` of ``args.model`` on ``args.dataset`` (conv maps max-pooled),
    also written to ``--save-latents``. A model trained on superclasses (DATASET:super,
    --superclasses): y = the fine classes (c1/c2's subclasses), y_super = the trained
    superclasses."""
    from lcc.analysis.measures import MeasureInput, parse_measures
    from lcc.io import save_npz_atomic
    from lcc.zoo.hierarchy import hierarchical_latents
    from lcc.zoo.latents import model_latents

    _check_model_args(args)
    names = ("split", "subset", "checkpoint", "data_dir", "batch_size", "seed")
    common = {name: getattr(args, name) for name in names}
    if args.dataset.endswith(":super") or args.superclasses:
        latents, y, y_super, predictions = hierarchical_latents(
            args.model, args.dataset, args.layers, superclasses=args.superclasses, **common
        )
        labels = {"y_super": y_super}
    else:
        why = f"dataset {args.dataset} has no superclass labels"
        _check_flat(parse_measures(args.measure), why)
        latents, y, predictions = model_latents(
            args.model,
            args.dataset,
            args.layers,
            pretrained=not args.no_pretrained,
            pool="max",
            **common,
        )
        labels = {}
    if args.save_latents is not None:
        arrays = {f"z_{layer}": z for layer, z in latents.items()}
        save_npz_atomic(args.save_latents, **arrays, y=y, **labels, predictions=predictions)
    return MeasureInput(latents, y, predictions=predictions, **labels)


def example(n_samples: int = 1200, *, seed: int = 0) -> Any:
    """A generated example: 4 classes of 3 overlapping subclasses in 32 dimensions.

    ``y`` holds the subclasses and ``y_super`` the classes, so c1-c4 all apply.

    >>> data = example(120)
    >>> data.layers["z"].shape, int(data.y.max()) + 1, int(data.y_super.max()) + 1
    ((120, 32), 12, 4)
    """
    from lcc.analysis.measures import MeasureInput
    from lcc.synthetic import gaussian_mixture

    z, classes, subclasses = gaussian_mixture(
        n_samples, 32, 4, 3, separation=3.0, noise=1.0, intrinsic_dim=16, seed=seed
    )
    return MeasureInput({"z": z}, subclasses, y_super=classes)


# --------------------------------------------------------------------------- checks


def _check_model_args(args: argparse.Namespace) -> None:
    if args.latents is not None:
        raise LCCInputError(
            f"pass either LATENTS ({args.latents}) or --model, not both; drop one of them"
        )
    missing = [f"--{name}" for name in ("dataset", "layers") if not getattr(args, name)]
    if missing:
        raise LCCInputError(
            f"--model needs {' and '.join(missing)}; e.g. --dataset digits --layers fc1 "
            "(`lcc layers MODEL` lists the layer names)"
        )
    if args.superclass_key is not None:
        raise LCCInputError(
            "--superclass-key reads a LATENTS file; with --model, name a superclass dataset "
            "(DATASET:super or --superclasses MAP.yaml)"
        )
    if args.save_latents is not None:
        _check_save_latents(args)


def _check_save_latents(args: argparse.Namespace) -> None:
    """--save-latents: a .npz in an existing folder; never the checkpoint; an existing file
    that is not latents saved by lcc measure only with --force."""
    from lcc.io import check_output_path

    out = Path(args.save_latents)
    if out.suffix.lower() != ".npz":
        raise LCCInputError(f"--save-latents must name a .npz file, got {out}")
    check_output_path(
        out, [args.checkpoint], force=args.force, kind=SAVED_LATENTS, label="--save-latents"
    )
    if not out.parent.is_dir():
        raise LCCInputError(f"cannot write {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise LCCInputError(f"cannot write {out}: it is a directory; pass a file name")


def _saved_latents(path: Path) -> bool:
    """Whether ``path`` holds latents written by ``--save-latents`` (z_<LAYER>, y, predictions)."""
    from lcc.io import array_keys

    try:
        keys = set(array_keys(path))
    except LCCInputError:
        return False
    return {"y", "predictions"} <= keys and any(key.startswith("z_") for key in keys)


def _check_example_layers(layers: list[str] | None, data: Any) -> None:
    unknown = [layer for layer in layers or () if layer not in data.layers]
    if unknown:
        raise LCCInputError(
            f"the generated example has one layer, z, not {unknown[0]!r}; drop --layers "
            "or pass LATENTS"
        )


def _check_file_args(args: argparse.Namespace) -> None:
    names = ("dataset", "checkpoint", "subset", "data_dir", "save_latents")
    given = [name for name in names if getattr(args, name) is not None]
    if given:
        raise LCCInputError(
            f"--{given[0].replace('_', '-')} applies to --model only; pass --model MODEL to "
            "collect latents, or drop it to measure LATENTS"
        )


def _check_flat(names: list[str], why: str) -> None:
    from lcc.analysis.measures import MEASURES

    needing = [name for name in names if MEASURES[name].needs_superclasses]
    if needing:
        raise LCCInputError(
            f"{' and '.join(needing)} {'need' if len(needing) > 1 else 'needs'} superclass "
            f"labels and {why}; measure c3,c4 "
            "here, or pass --save-latents OUT.npz, add y_super (N,) superclass labels to it "
            "and run `lcc measure OUT.npz --measure c1,c2`"
        )
