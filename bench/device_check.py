"""The GPU check of issue 21, as one markdown table (``bench/device_check.sh`` runs it).

On a machine with CUDA it runs, within ``--budget`` seconds (default 420: the issue allows 8
minutes on one GPU):

(a) the CUDA-marked tests (``python3 -m pytest -m cuda tests``);
(b) one refresh of planted latents (:func:`lcc.synthetic.planted_latents`, 1,000 classes x 3
    sub-clusters, 512 dimensions, as ``bench/bench_scale.py``) at 50,000 and 1,280,000 rows on
    the GPU (``device="cuda"``) and on the CPU path. At 50,000 both are exact; at 1,280,000 the
    CPU path runs the fast mode (``--knn approximate --pca 64 --targets approximate``, as
    ``bench_scale.py`` does: exact search on the CPU would not fit the time) and the GPU the same
    settings with its exact search, plus the GPU's exact k-NN of all 512 dimensions alone. Each
    row's k-NN recall is measured on a seeded sample of 1,000 rows against exact neighbours (faiss
    brute force for the GPU's, the GPU's exact search for the CPU's);
(c) one epoch of ``lcc train small-resnet`` on full Fashion-MNIST with ``--precision
    bf16-mixed`` on the GPU, with and without LCC, and their epoch ratio (skipped, saying why,
    when ``lcc train`` has no ``--precision`` yet or Fashion-MNIST is not found);
(d) the peak GPU memory of each part.

Without CUDA (or with ``--dry-run``) it prints what it would run and exits 0. ``--small`` runs
the same code at tiny sizes; without CUDA it then compares the CPU path with the torch path on
CPU tensors (``backend="torch"``, the code the GPU runs) and trains on 2,000 images on the CPU.
With ``$OUT`` set, the table is also written to ``$OUT/device_check.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
CARRIED_FASHION = ROOT / ".devcarry" / "fashion-mnist"
RECALL_ROWS = 1_000
K = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (checks the code)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all parts")
    parser.add_argument("--skip-tests", action="store_true", help="leave out part (a)")
    parser.add_argument("--skip-train", action="store_true", help="leave out part (c)")
    return parser.parse_args(argv)


class Table:
    """Rows of the markdown table, printed as they come."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, part: str, what: str, result: str) -> None:
        self.rows.append((part, what, result))
        print(f"  {part} | {what} | {result}", flush=True)
        if os.environ.get("OUT"):  # what is there comes back even if the run is stopped
            Path(os.environ["OUT"], "device_check.md").write_text(self.markdown() + "\n")

    def markdown(self) -> str:
        lines = ["| part | what | result |", "| --- | --- | --- |"]
        lines += [f"| {p} | {w} | {r} |" for p, w, r in self.rows]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------- plan


def plan(args: argparse.Namespace, cuda: bool) -> list[str]:
    sizes = sizes_for(args)
    device = "cuda" if cuda or not args.small else "cpu (torch path, backend='torch')"
    return [
        f"(a) python3 -m pytest -m cuda {' '.join(cuda_test_files())} -q  (timeout 150 s)",
        f"(b) refresh of planted latents, {', '.join(f'{n:,} x {d}' for n, d in sizes)}: "
        f"device={device} vs the CPU path (fast mode at the largest size), recall on "
        f"{RECALL_ROWS} sampled rows",
        "(c) lcc train small-resnet "
        + ("fashion-mnist (full)" if not args.small else "fashion-mnist --subset 2000")
        + " --epochs 1 --warmup 0 --precision bf16-mixed, with and without --no-lcc; "
        "epoch ratio",
        "(d) peak GPU memory of each part",
    ]


def sizes_for(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(3_000, 64), (12_000, 64)] if args.small else [(50_000, 512), (1_280_000, 512)]


# ----------------------------------------------------------------------------------- (a)


def cuda_test_files() -> list[str]:
    """The test files holding a CUDA-marked test (collecting only those is quicker)."""
    marked = (
        p for p in sorted((ROOT / "tests").rglob("test_*.py")) if "mark.cuda" in p.read_text()
    )
    return [str(p.relative_to(ROOT)) for p in marked] or ["tests"]


def run_tests(table: Table, timeout: float) -> None:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        *cuda_test_files(),
        "-q",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        if done.returncode not in (0, 5):
            print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    except subprocess.TimeoutExpired:
        tail = f"stopped after {timeout:.0f} s"
    table.add(
        "(a)",
        "pytest -m cuda (the marked files)",
        f"{tail} ({time.perf_counter() - started:.0f} s)",
    )


# ----------------------------------------------------------------------------------- (b)


def planted(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from lcc.synthetic import planted_latents

    classes = 1_000 if n >= 50_000 else 20
    data = planted_latents(
        n,
        dim,
        classes,
        3,
        label_noise=0.1,
        intrinsic_dim=48 if dim > 48 else None,
        separation=3.0,
        seed=seed,
    )
    return np.asarray(data.z, dtype=np.float32), np.asarray(data.y)


def sampled_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each sampled row's true neighbours that ``found`` lists."""
    hits = [
        len(set(f.tolist()) & set(t.tolist())) / t.size for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits))


def exact_sample(space: np.ndarray, rows: np.ndarray, device: str | None) -> np.ndarray:
    """Exact k nearest other rows of ``rows`` (faiss brute force, or torch on ``device``)."""
    from lcc.engine.exact_search import drop_self
    from lcc.engine.knn import search

    indices, distances = search(space, space[rows], K + 1, device=device, backend="auto")
    return drop_self(indices, distances, rows)[0]


def run_refresh(
    table: Table, sizes: list[tuple[int, int]], largest: bool, cuda: bool, deadline: float
) -> float:
    """Part (b) for ``sizes`` (``largest``: the fast mode and the 512-d GPU search)."""
    import torch

    from lcc.engine.knn import knn
    from lcc.engine.refresh import refresh

    peak = 0.0
    target = "cuda" if cuda else "cpu"
    backend = "auto" if cuda else "torch"
    for n, dim in sizes:
        if time.perf_counter() > deadline:
            table.add("(b)", f"refresh {n:,} x {dim}", "skipped: out of time")
            continue
        started = time.perf_counter()
        z, y = planted(n, dim)
        print(f"generated {n:,} x {dim} in {time.perf_counter() - started:.1f} s", flush=True)
        options: dict[str, Any] = {"k": K, "seed": 0}
        if largest:
            options.update(knn="approximate", pca=min(64, dim // 2), targets="approximate")
        mode = "fast (approximate k-NN, PCA, approximate targets)" if largest else "exact"
        rows = np.sort(np.random.default_rng(123).choice(n, min(RECALL_ROWS, n), replace=False))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        gpu = refresh(z, y, device=target, backend=backend, **options)
        gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        peak = max(peak, gpu_peak)
        gpu_space = gpu.projection.apply(z) if gpu.projection is not None else z
        gpu_found = knn(gpu_space, K, device=target, backend=backend).indices[rows]
        gpu_recall = sampled_recall(gpu_found, exact_sample(gpu_space, rows, None))
        table.add(
            "(b)",
            f"refresh {n:,} x {dim}, {mode}, {'GPU' if cuda else 'torch on CPU'}",
            f"{stages(gpu.seconds)}, recall {gpu_recall:.3f}, peak GPU {gpu_peak:.2f} GiB",
        )
        what = f"refresh {n:,} x {dim}, {mode}, CPU path ({os.cpu_count()} cores)"
        if time.perf_counter() > deadline:
            table.add("(b)", what, "skipped: out of time")
            del z, y, gpu
            continue
        cpu = refresh(z, y, **options)
        same = (
            "same clusters"
            if np.array_equal(gpu.clusters, cpu.clusters)
            else f"clusters {gpu.n_clusters} (GPU) vs {cpu.n_clusters}"
        )
        recall = "recall not measured: out of time"
        if time.perf_counter() < deadline:  # the same (seeded) search again, for its neighbours
            space = cpu.projection.apply(z) if cpu.projection is not None else z
            cpu_found = knn(space, K, mode=options.get("knn", "exact"), seed=0).indices[rows]
            reference = exact_sample(space, rows, target if cuda else None)
            recall = f"recall {sampled_recall(cpu_found, reference):.3f}"
        table.add("(b)", what, f"{stages(cpu.seconds)}, {recall}; {same}")
        if largest and cuda and time.perf_counter() < deadline:
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            found = knn(torch.from_numpy(z).cuda(), K)
            seconds = time.perf_counter() - started
            recall_512 = sampled_recall(found.indices[rows], exact_sample(z, rows, None))
            search_peak = torch.cuda.max_memory_allocated() / 2**30
            peak = max(peak, search_peak)
            table.add(
                "(b)",
                f"exact k-NN (k={K}) of all {n:,} x {dim}, GPU",
                f"{seconds:.1f} s, recall {recall_512:.3f} (faiss exact on {len(rows)} rows), "
                f"peak GPU {search_peak:.2f} GiB",
            )
        del z, y, gpu, cpu
    return peak


def stages(seconds: dict[str, float]) -> str:
    """A refresh's total seconds and its main stages."""
    return (
        f"{seconds['total']:.1f} s (k-NN {seconds['knn']:.1f} s, cluster "
        f"{seconds['cluster']:.1f} s, targets {seconds['targets']:.1f} s)"
    )


# ----------------------------------------------------------------------------------- (c)


def fashion_spec(small: bool) -> str | None:
    if FASHION.is_dir():
        return "fashion-mnist"
    if CARRIED_FASHION.is_dir():
        return f"idx:{CARRIED_FASHION}"
    return None


def has_flag(flag: str) -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "lcc", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return flag in done.stdout


class GpuMemory:
    """Largest ``memory.used`` that ``nvidia-smi`` reports while the block runs (MiB)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=False,
                ).stdout
                self.peak = max([self.peak, *(float(v) for v in out.split() if v.strip())])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def train_once(spec: str, out: Path, lcc: bool, args: argparse.Namespace, cuda: bool) -> dict:
    command = [
        sys.executable,
        "-m",
        "lcc",
        "train",
        "small-resnet",
        spec,
        "--out",
        str(out),
        "--epochs",
        "1",
        "--warmup",
        "0",
        "--no-pretrained",
        "--precision",
        "bf16-mixed" if cuda else "32",
        "--accelerator",
        "gpu" if cuda else "cpu",
        "--num-workers",
        "4" if cuda else "0",
    ]
    if cuda and has_flag("--refresh-device"):
        command += ["--refresh-device", "cuda"]
    if args.small:
        command += ["--subset", "2000", "--test-subset", "500"]
    if not lcc:
        command.append("--no-lcc")
    print(" ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads((out / "metrics.json").read_text())


def run_train(table: Table, args: argparse.Namespace, cuda: bool) -> float:
    if not has_flag("--precision"):
        table.add("(c)", "lcc train, bf16-mixed", "skipped: lcc train has no --precision yet")
        return 0.0
    spec = fashion_spec(args.small)
    if spec is None:
        table.add(
            "(c)",
            "lcc train",
            "skipped: no Fashion-MNIST (install dataset-fashion-mnist "
            "or carry .devcarry/fashion-mnist)",
        )
        return 0.0
    results = {}
    with tempfile.TemporaryDirectory(prefix="lcc-device-") as folder, GpuMemory() as memory:
        for lcc in (False, True):
            results[lcc] = train_once(spec, Path(folder) / f"lcc{int(lcc)}", lcc, args, cuda)
    for lcc in (False, True):
        metrics = results[lcc]
        name = "with LCC" if lcc else "without LCC (--no-lcc)"
        if "error" in metrics:
            table.add("(c)", f"one epoch, {name}", f"failed: {metrics['error']}")
            continue
        table.add(
            "(c)",
            f"one epoch of small-resnet on {metrics.get('n_train', '?')} images, {name}",
            f"{metrics['mean_epoch_seconds']:.1f} s (refresh "
            f"{metrics.get('total_refresh_seconds', 0.0):.1f} s), test top-1 "
            f"{metrics.get('test_top1', float('nan')):.3f}",
        )
    if all("error" not in m for m in results.values()):
        ratio = results[True]["mean_epoch_seconds"] / results[False]["mean_epoch_seconds"]
        table.add("(c)", "epoch ratio, with / without LCC", f"{ratio:.2f}")
    return memory.peak / 1024


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    header = (
        f"# device check ({time.strftime('%Y-%m-%d')}): {platform.platform()}, torch "
        f"{torch.__version__}, "
        + (torch.cuda.get_device_name(0) if cuda else "no CUDA")
        + f", {os.cpu_count()} CPUs"
    )
    print(header, flush=True)
    if args.dry_run or (not cuda and not args.small):
        print("dry run: this machine has no CUDA" if not cuda else "dry run", flush=True)
        print("would run:", *plan(args, cuda), sep="\n  ", flush=True)
        return 0
    deadline = time.perf_counter() + args.budget
    table = Table()
    if not args.skip_tests:
        run_tests(table, timeout=150 if cuda else 60)
    small, large = sizes_for(args)
    peak = run_refresh(table, [small], False, cuda, deadline)
    if not args.skip_train:  # before the largest refresh: the longest part goes last
        train_peak = run_train(table, args, cuda)
        if cuda:
            table.add("(d)", "peak GPU memory, training (nvidia-smi)", f"{train_peak:.2f} GiB")
    peak = max(peak, run_refresh(table, [large], True, cuda, deadline))
    if cuda:
        table.add("(d)", "peak GPU memory, refresh parts (torch allocator)", f"{peak:.2f} GiB")
    text = header + "\n\n" + table.markdown() + "\n"
    print("\n" + text, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "device_check.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
