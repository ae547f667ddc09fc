"""Training samples per second with fitkit, per device, model and setting: what a GPU buys, which settings pay.

Models: the overhead benchmark's MLP (32-64-10, batch 64) and small CNN (3x32x32, batch 128), and
torchvision's ResNet-18 on synthetic 64x64 images (batch 128; ``--image-size`` to change). Settings,
one at a time from the float32 baseline and then together: ``precision="bf16"``, ``precision="fp16"``
(CUDA only), ``channels_last=True`` (image models), ``compile=True``, and ``all`` (bf16, channels_last
and compile on CUDA; what pays on the CPU there). ``--grid`` runs the full cross product instead.

Each measurement runs in its own process: ``Trainer(...).fit`` over one synthetic batch already on the
device, repeated (so the figure is the model and the loop, not data loading), after a warm-up that
includes compilation (reported separately), then timed fits of about ``--seconds`` each; the median of
``--repeats`` is reported. The CPU uses torch's default threads (one per core) unless ``--threads``.

The ``fp32 + loader`` row adds what the others leave out: the batches come from a DataLoader over 16
batches of CPU tensors, with ``--loader-workers`` worker processes (default 2) and, on CUDA,
``pin_memory=True``, so each step includes collation, pinning and the host-to-device copy (non-blocking,
from pinned memory). Its CPU-vs-GPU ratio is the one a real input pipeline sees.

GPU rows set ``torch.backends.cudnn.benchmark = True`` (fixed shapes: cuDNN picks its fastest kernels
during the warm-up) and state the TF32 setting: ``--tf32 default`` keeps torch's defaults (TF32 off for
matmuls, on for cuDNN convolutions), ``on``/``off`` set both; every row records them.

Usage::

    python benchmarks/throughput.py                        # CPU, and CUDA when present (minutes)
    python benchmarks/throughput.py --devices cuda --models resnet18 --grid
    python benchmarks/throughput.py --models mlp,cnn --no-compile   # skip compilation (quick)

Each row also gives the model's FLOP/s: the FLOPs of one training sample (forward and backward, counted once with
``torch.utils.flop_counter.FlopCounterMode`` on the plain model, as ``fitkit.callbacks.ThroughputMonitor`` counts
them) times samples/s; on a GPU that ``fitkit.callbacks.throughput.PEAK_TFLOPS`` lists, the MFU too (FLOP/s over
the GPU's dense peak for the row's precision: TF32 for fp32 rows when matmuls may use it).

Writes ``benchmarks/results/throughput.json``, ``throughput.md`` and ``throughput.png`` (the chart needs
matplotlib: ``pip install fitkit[bench]``; without it the JSON and table are still written).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = {
    # name: (input shape, batch size)
    "mlp": ((32,), 64),
    "cnn": ((3, 32, 32), 128),
    "resnet18": (None, 128),  # (3, image_size, image_size)
}
LOADER_BATCHES = 16  # distinct CPU batches behind the DataLoader row (sampled with replacement)


def _settings(model: str, device: str, grid: bool, compile_ok: bool) -> list[dict[str, Any]]:
    images = model != "mlp"
    precisions = ["32", "bf16"] + (["fp16"] if device == "cuda" else [])
    layouts = [False, True] if images else [False]
    compiles = [False, True] if compile_ok else [False]
    if grid:
        return [
            {"precision": p, "channels_last": c, "compile": k}
            for p, c, k in itertools.product(precisions, layouts, compiles)
        ]
    base = {"precision": "32", "channels_last": False, "compile": False}
    out = [dict(base)]
    out += [dict(base, precision=p) for p in precisions[1:]]
    if images:
        out.append(dict(base, channels_last=True))
    if compile_ok:
        out.append(dict(base, compile=True))
    combined = {"precision": "bf16", "channels_last": images, "compile": compile_ok}
    if combined not in out:
        out.append(combined)
    out.append(dict(base, loader=True))  # the fp32 baseline with a worker-fed (pinned on CUDA) DataLoader
    return out


def label(setting: dict[str, Any]) -> str:
    parts = [{"32": "fp32", "bf16": "bf16", "fp16": "fp16"}[setting["precision"]]]
    if setting["channels_last"]:
        parts.append("channels_last")
    if setting["compile"]:
        parts.append("compile")
    if setting.get("loader"):
        parts.append("loader")
    return " + ".join(parts)


# -- one measurement (child process) ---------------------------------------------------------------
def _build(model_name: str, image_size: int) -> tuple[Any, tuple[int, ...]]:
    from torch import nn
    from workloads import build_model

    shape, _ = MODELS[model_name]
    if model_name == "resnet18":
        from torchvision.models import resnet18

        return resnet18(num_classes=10), (3, image_size, image_size)
    model = build_model(model_name)
    assert isinstance(model, nn.Module)
    return model, shape


def child(args: argparse.Namespace) -> None:
    import torch

    import fitkit

    setting = json.loads(args.setting)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu: dict[str, Any] = {}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN autotunes during the warm-up
        if args.tf32 != "default":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
        gpu = {
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "gpu": torch.cuda.get_device_name(device),
        }
    torch.manual_seed(0)
    model, shape = _build(args.model, args.image_size)
    batch_size = args.batch_size or MODELS[args.model][1]
    x = torch.randn(batch_size, *shape, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    flops_per_sample = _flops_per_sample(model.to(device), x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = fitkit.Trainer(
        model,
        optimizer,
        "cross_entropy",
        device=device,
        verbose=0,
        precision=setting["precision"],
        channels_last=setting["channels_last"],
        compile=setting["compile"],
    )

    loader = None
    if setting.get("loader"):
        from torch.utils.data import DataLoader, Sampler, TensorDataset

        class Draws(Sampler[int]):
            """``samples`` random indices (with replacement); resized before each timed fit, so that one
            DataLoader with persistent workers serves every fit (no worker start-up in the timings)."""

            def __init__(self) -> None:
                self.samples, self.generator = batch_size, torch.Generator().manual_seed(0)

            def __iter__(self) -> Any:
                yield from torch.randint(0, LOADER_BATCHES * batch_size, (self.samples,), generator=self.generator)

            def __len__(self) -> int:
                return self.samples

        g = torch.Generator().manual_seed(0)
        cpu_x = torch.randn(LOADER_BATCHES * batch_size, *shape, generator=g)
        cpu_y = torch.randint(0, 10, (LOADER_BATCHES * batch_size,), generator=g)
        draws = Draws()
        loader = DataLoader(
            TensorDataset(cpu_x, cpu_y),
            batch_size=batch_size,
            sampler=draws,
            num_workers=args.loader_workers,
            persistent_workers=args.loader_workers > 0,
            pin_memory=device.type == "cuda",  # fitkit then copies with non_blocking=True
            drop_last=True,
        )

    def batches_for(steps: int) -> Any:
        if loader is None:
            return [(x, y)] * steps  # one batch on the device, again and again: no data loading
        draws.samples = steps * batch_size
        return loader

    def timed_fit(steps: int) -> float:
        batches = batches_for(steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        trainer.fit(batches, epochs=1)  # ends with the epoch's logs: one host sync
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warmup_s = timed_fit(args.warmup_steps)  # compiles, autotunes, fills the caching allocator
    probe = max(timed_fit(3) / 3, 1e-6)
    steps = int(min(max(args.seconds / probe, 5), 2000))
    times = [timed_fit(steps) for _ in range(args.repeats)]
    per_step = statistics.median(times) / steps
    from fitkit.callbacks.throughput import peak_flops

    flop_per_s = flops_per_sample * batch_size / per_step
    peak = peak_flops(device, setting["precision"])
    print(
        "RESULT "
        + json.dumps(
            {
                "samples_per_s": batch_size / per_step,
                "flops_per_sample": flops_per_sample,
                "flop_per_s": flop_per_s,
                "mfu": None if peak is None else flop_per_s / peak,
                "step_ms": per_step * 1e3,
                "steps": steps,
                "repeats": args.repeats,
                "batch_size": batch_size,
                "input_shape": list(shape),
                "warmup_s": warmup_s,
                "threads": torch.get_num_threads(),
                "samples_per_s_all": [batch_size * steps / t for t in times],
                "loader_workers": args.loader_workers if setting.get("loader") else None,
                **gpu,
            }
        ),
        flush=True,
    )


def _flops_per_sample(model: Any, x: Any, y: Any) -> float:
    """Forward and backward FLOPs of one sample (one batch's, counted by ``FlopCounterMode``, over its size);
    the gradients it leaves are dropped before training starts."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


# -- the parent ---------------------------------------------------------------------------------
def _measure(args: argparse.Namespace, device: str, model: str, setting: dict[str, Any]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--device",
        device,
        "--model",
        model,
        "--setting",
        json.dumps(setting),
        "--image-size",
        str(args.image_size),
        "--seconds",
        str(args.seconds),
        "--repeats",
        str(args.repeats),
        "--warmup-steps",
        str(args.warmup_steps),
    ]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--tf32", args.tf32, "--loader-workers", str(args.loader_workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    row: dict[str, Any] = {"device": device, "model": model, "setting": label(setting), **setting}
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        row["error"] = tail[:300]
        return row
    row.update(json.loads(lines[-1][len("RESULT ") :]))
    return row


def _si(value: float) -> str:
    """``value`` with an SI prefix: 3.8e6 -> "3.8 M"."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def markdown(rows: list[dict[str, Any]]) -> str:
    def baseline(device: str, model: str, setting: str = "fp32") -> float | None:
        match = [r for r in rows if (r["device"], r["model"], r["setting"]) == (device, model, setting)]
        return match[0].get("samples_per_s") if match else None

    lines = [
        "| device | model | setting | samples/s | ms/step | FLOP/s | MFU | vs fp32 on this device "
        "| vs CPU (fp32; loader: CPU loader) | warm-up s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['device']} | {r['model']} | {r['setting']} |"
        if "samples_per_s" not in r:
            lines.append(f"{head} n/a: {r['error']} | | | | | | |")
            continue
        ratios = []
        cpu_base = baseline("cpu", r["model"], r["setting"] if r.get("loader") else "fp32")  # like for like
        for base in (baseline(r["device"], r["model"]), cpu_base):
            ratios.append("" if not base else f"{r['samples_per_s'] / base:.2f}x")
        flops = _si(r["flop_per_s"]) if r.get("flop_per_s") else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(
            f"{head} {r['samples_per_s']:,.0f} | {r['step_ms']:.2f} | {flops} | {mfu} | {ratios[0]} | {ratios[1]} "
            f"| {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install fitkit[bench])", file=sys.stderr)
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    devices = list(dict.fromkeys(r["device"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.6), squeeze=False)
    colors = {"cpu": "#4C72B0", "cuda": "#55A868", "mps": "#C44E52"}
    for ax, model in zip(axes[0], models):
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["model"] == model))
        width = 0.8 / len(devices)
        for d, device in enumerate(devices):
            values = []
            for setting in settings:
                match = [r for r in rows if r["model"] == model and r["device"] == device and r["setting"] == setting]
                values.append(match[0].get("samples_per_s", 0.0) if match else 0.0)
            positions = [i + (d - (len(devices) - 1) / 2) * width for i in range(len(settings))]
            bars = ax.bar(positions, values, width, label=device, color=colors.get(device))
            for bar, value in zip(bars, values):
                ax.annotate(
                    "n/a" if value == 0 else f"{value:,.0f}",
                    (bar.get_x() + bar.get_width() / 2, max(value, 1.0)),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                )
        ax.set_yscale("log")
        shown = [r["samples_per_s"] for r in rows if r["model"] == model and r.get("samples_per_s")]
        if shown:
            ax.set_ylim(min(shown) / 2, max(shown) * 6)  # room for the labels above the bars
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=8)
        ax.set_title(model)
        ax.set_ylabel("training samples / s (log)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices", default=None, help="comma-separated: cpu, cuda (default: cpu, plus cuda if present)"
    )
    parser.add_argument("--models", default="mlp,cnn,resnet18", help="comma-separated: mlp, cnn, resnet18")
    parser.add_argument("--grid", action="store_true", help="every combination instead of one change at a time")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings")
    parser.add_argument("--image-size", type=int, default=64, help="ResNet-18 input size (default 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    parser.add_argument("--seconds", type=float, default=2.0, help="target length of each timed fit")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per measurement (median)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (compilation included)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads per process (default: torch's, one per core)"
    )
    parser.add_argument(
        "--tf32",
        choices=["default", "on", "off"],
        default="default",
        help="GPU rows: TF32 for matmuls and cuDNN (default: torch's defaults, matmul off, cuDNN on)",
    )
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers of the loader row")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON, table and chart")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import torch
    from workloads import machine_info

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices names cuda, but CUDA is not available here")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    compile_ok = not args.no_compile and hasattr(torch, "compile")
    info = machine_info()
    print(
        f"# {info['cpu']}, {info['cpu_count']} cores, GPU: {info['cuda'] or 'none'}, torch {info['torch']}",
        file=sys.stderr,
    )
    rows = []
    started = time.time()
    for device in devices:
        for model in models:
            for setting in _settings(model, device, args.grid, compile_ok):
                row = _measure(args, device, model, setting)
                rows.append(row)
                shown = f"{row['samples_per_s']:,.0f} samples/s" if "samples_per_s" in row else f"n/a ({row['error']})"
                print(f"{device:5s} {model:9s} {row['setting']:32s} {shown}", file=sys.stderr, flush=True)
    table = markdown(rows)
    gpu_rows = [r for r in rows if r["device"] == "cuda" and "tf32_matmul" in r]
    if gpu_rows:  # stated under the table: the GPU figures depend on it
        r = gpu_rows[0]
        table += (
            f"\n\nGPU rows ({r['gpu']}): TF32 matmul {'on' if r['tf32_matmul'] else 'off'}, TF32 cuDNN "
            f"{'on' if r['tf32_cudnn'] else 'off'} (--tf32 {args.tf32}), cudnn.benchmark=True. "
        )
    table += (
        f"\n'loader' rows: a DataLoader with {args.loader_workers} workers over {LOADER_BATCHES} CPU batches "
        "(pin_memory=True on CUDA): collation, pinning and the host-to-device copy included."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "throughput",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": info,
        "image_size": args.image_size,
        "tf32": args.tf32,
        "loader_workers": args.loader_workers,
        "wall_s": time.time() - started,
        "rows": rows,
        "markdown": table,
    }
    (args.out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "throughput.md").write_text(table + "\n")
    threads = next((r["threads"] for r in rows if r["device"] == "cpu" and "threads" in r), None)
    title = (
        f"fitkit training throughput - CPU: {info['cpu']} ({info['cpu_count']} cores, "
        f"{threads} thread{'s' if threads != 1 else ''})" + (f", GPU: {info['cuda']}" if info["cuda"] else ", no GPU")
    )
    drawn = chart(rows, args.out / "throughput.png", title)
    print(table)
    print(
        f"\nwrote {args.out / 'throughput.json'}, throughput.md{', throughput.png' if drawn else ''} "
        f"({report['wall_s']:.0f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
