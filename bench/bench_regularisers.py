"""Per-step overhead of the latent-geometry-graph regularisers (issue 7).

Times ``reg(batch).backward()`` (forward + backward of the regulariser's term alone, not of
the model) on a batch of ``--batch`` x ``--dim`` float32 latents with 10 classes:

* ``label-variation`` and ``smoothness`` over ``--layers`` layers (target: <= 2 ms for 4 layers
  on CPU), once on non-negative latents (``auto`` -> cosine) and once on signed ones (RBF);
* ``gkd``: one (teacher, student) pair of latents of the same size (target: <= 3 ms); the
  teacher is an identity module whose output is precomputed latents, so its network forward
  (which depends on the teacher) is not counted, its graph is.

Also printed: the floor of one layer's exact k-NN graph, the Gram matrix ``Z Z^T`` and the
top-k selection in its rows, which no implementation of the exact graph can skip (no gradient,
no loss), and each regulariser's time as a multiple of that floor (times its layers), a figure
that varies less than milliseconds between machines and loads. Each figure is the median (and
fastest) over ``--repeat`` blocks of ``--number`` steps (``torch.utils.benchmark``), with the
default thread count and one thread. The last line is JSON with every figure.

Usage: ``python bench/bench_regularisers.py [--batch 256] [--dim 512] [--layers 4] [--k 10]
[--repeat 30] [--number 10]``
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torch.utils import benchmark

from lcc.regularisers.base import Batch, Regulariser
from lcc.regularisers.gkd import GraphDistillation
from lcc.regularisers.label_variation import LabelVariation
from lcc.regularisers.smoothness import Smoothness

TARGETS_MS = {"label-variation": 2.0, "smoothness": 2.0, "gkd": 3.0}


def make_batch(args: argparse.Namespace, signed: bool, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (args.batch,), generator=generator)
    latents = {}
    for layer in range(args.layers):
        z = torch.randn(args.batch, args.dim, generator=generator) + y[:, None] * 0.05
        latents[f"layer{layer}"] = (z if signed else z.relu()).requires_grad_(True)
    teacher = torch.randn(args.batch, args.dim, generator=generator)
    return Batch(
        latents=latents,
        y=y,
        indices=torch.arange(args.batch),
        logits=torch.zeros(args.batch, 10),
        x=teacher if signed else teacher.relu(),
    )


def time_step(reg: Regulariser, batch: Batch, args: argparse.Namespace) -> tuple[float, float]:
    """(median, fastest) seconds per ``reg(batch).backward()`` over ``repeat`` blocks."""
    for _ in range(3):  # warm-up (allocator, lazy set-up)
        reg(batch).backward()
    timer = benchmark.Timer(
        stmt="reg(batch).backward()",
        globals={"reg": reg, "batch": batch},
        num_threads=torch.get_num_threads(),
    )
    per_step = [timer.timeit(args.number).mean for _ in range(args.repeat)]
    per_step.sort()
    return per_step[len(per_step) // 2], per_step[0]


def graph_floor(args: argparse.Namespace) -> float:
    """Median seconds of ``Z Z^T`` and its rows' top-k: one layer's exact-graph floor."""
    z = torch.randn(args.batch, args.dim)
    timer = benchmark.Timer(
        stmt="(z @ z.T).topk(k, dim=1, sorted=False)",
        globals={"z": z, "k": args.k + 1},  # k + 1: each row's own entry comes first
        num_threads=torch.get_num_threads(),
    )
    times = sorted(timer.timeit(args.number).mean for _ in range(args.repeat))
    return times[len(times) // 2]


def regularisers(args: argparse.Namespace) -> list[tuple[str, Regulariser]]:
    layers = [f"layer{i}" for i in range(args.layers)]
    graph = {"k": args.k}
    teacher = GraphDistillation(
        teacher=nn.Identity(), teacher_layers=["output"], layers=[layers[0]], **graph
    )
    teacher.bind(nn.Identity(), num_classes=10)
    return [
        ("label-variation", LabelVariation(layers=layers, **graph)),
        ("smoothness", Smoothness(layers=layers, **graph)),
        ("gkd", teacher),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=30, help="timed blocks per figure")
    parser.add_argument("--number", type=int, default=10, help="steps per timed block")
    args = parser.parse_args()
    if args.layers < 2 or args.repeat < 1 or args.number < 1:
        parser.error("--layers must be >= 2, --repeat and --number >= 1")

    figures: dict[str, object] = {
        "batch": args.batch,
        "dim": args.dim,
        "layers": args.layers,
        "k": args.k,
        "repeat": args.repeat,
        "number": args.number,
        "torch": torch.__version__,
    }
    threads = torch.get_num_threads()
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        floor = graph_floor(args)
        figures[f"graph_floor_ms_per_layer_{n_threads}thread"] = round(floor * 1e3, 4)
        print(
            f"{n_threads} thread(s): exact-graph floor (Gram + top-k) per layer "
            f"{floor * 1e3:.3f} ms, {args.layers} layers {args.layers * floor * 1e3:.3f} ms"
        )
        for signed, kind in ((False, "cosine"), (True, "rbf")):
            batch = make_batch(args, signed)
            for name, reg in regularisers(args):
                median, fastest = time_step(reg, batch, args)
                key = f"{name}_{kind}_ms_{n_threads}thread"
                figures[key] = round(median * 1e3, 4)
                figures[key + "_min"] = round(fastest * 1e3, 4)
                graphs = 2 if name == "gkd" else args.layers  # GKD: teacher's and student's
                ratio = median / (graphs * floor)
                figures[key.replace("_ms_", "_floors_")] = round(ratio, 3)
                scope = "1 layer pair" if name == "gkd" else f"{args.layers} layers"
                verdict = "met" if median * 1e3 <= TARGETS_MS[name] else "not met"
                print(
                    f"{n_threads} thread(s): {name} ({kind}, {scope}, {args.batch}x{args.dim}, "
                    f"k={args.k}) fwd+bwd median {median * 1e3:.3f} ms, min {fastest * 1e3:.3f} "
                    f"ms = {ratio:.2f}x the floor of its {graphs} graphs; "
                    f"target <= {TARGETS_MS[name]:g} ms: {verdict}"
                )
    torch.set_num_threads(threads)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
