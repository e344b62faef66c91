"""Benchmarks of the models (not tests): patches per second and whole-mammogram read time.

    .venv/bin/python bench/bench_models.py [--threads 2] [--quick] [--json OUT.json]
    .venv/bin/python bench/bench_models.py --skip-cpu --skip-read --widths 8,16,32,64,128 \
        --widths 16,32,64,128,128 --widths 8,16,32,64,256        # the slim-width study

- Parameter counts of ``vgg16_slim`` and ``vgg16_1ch``.

- Patches/s for ``vgg16_slim`` and ``vgg16_1ch`` on 512 x 512 x 1 input, batch 1 and 8, fp32:
  plain eager (``torch.no_grad``, contiguous) against ``torch.inference_mode`` + channels_last, with
  the ratio side by side.
- Training steps of ``vgg16_slim`` (batch 8), contiguous against channels_last.
- A whole-mammogram read (3328 x 2560, synthetic, through the real catalog and reader path) with
  the slim model: first read (load pixels, foreground, inference, maps, cache) and the cached read.
- ``--widths W1,...,W5`` (repeatable): a slim-style network (global average pool, 128-wide head) with
  those block widths, forward (inference_mode + channels_last) and training (channels_last), batch 8.
- On a GPU (when ``torch.cuda.is_available()``): ``vgg16_1ch`` at batch 1/8/32 in fp32, bf16 and fp16
  autocast (channels_last), with the card's name.

Numbers go to bench/RESULTS.md by hand (with the machine, the card and the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.vgg import CONFIGS, VggConfig, build_vgg  # noqa: E402

SIZE = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def patches_per_second(model: torch.nn.Module, batch: int, *, device: torch.device, mode: str,
                       min_seconds: float, dtype: torch.dtype | None = None) -> float:
    """Forward throughput. ``mode``: "eager" (no_grad, contiguous) or "fast" (inference_mode, channels_last)."""
    x = torch.rand(batch, 1, SIZE, SIZE, device=device)
    if mode == "fast":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        context = torch.inference_mode
    else:
        model = model.to(memory_format=torch.contiguous_format)
        context = torch.no_grad

    def once() -> None:
        if dtype is not None:
            with torch.autocast(device.type, dtype=dtype):
                model(x)
        else:
            model(x)

    with context():
        once()  # warm-up (allocations, kernel choice)
        _sync(device)
        started, n = time.perf_counter(), 0
        while True:
            once()
            n += batch
            _sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds and n >= batch * 2:
                return n / elapsed


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    rows = []
    device = torch.device("cpu")
    for arch in ("vgg16_slim", "vgg16_1ch"):
        model = build_vgg(arch).eval()
        print(f"{arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
        for batch in (1, 8):
            if args.quick and arch == "vgg16_1ch" and batch == 8:
                continue
            seconds = args.seconds if arch == "vgg16_slim" else args.seconds * 3
            eager = patches_per_second(model, batch, device=device, mode="eager", min_seconds=seconds)
            fast = patches_per_second(model, batch, device=device, mode="fast", min_seconds=seconds)
            row = {"arch": arch, "batch": batch, "eager_fp32": eager, "inference_mode_channels_last": fast,
                   "ratio": fast / eager}
            rows.append(row)
            print(f"{arch:11s} batch {batch}:  eager fp32 {eager:7.2f} patches/s   inference_mode+channels_last "
                  f"{fast:7.2f} patches/s   ratio {fast / eager:4.2f}x", flush=True)
    return rows


def bench_widths(args: argparse.Namespace) -> list[dict]:
    rows = []
    for text in args.widths:
        widths = tuple(int(w) for w in text.split(","))
        config = replace(CONFIGS["vgg16_slim"], widths=widths)  # vgg16_slim's global pool and head, other widths
        forward = patches_per_second(build_vgg(config).eval(), 8, device=torch.device("cpu"), mode="fast",
                                     min_seconds=args.seconds)
        training = train_patches_per_second(config, 8, channels_last=True,
                                            min_seconds=args.seconds * 2)
        rows.append({"widths": widths, "forward": forward, "train": training})
        print(f"widths {widths}: forward {forward:.1f} patches/s, training {training:.1f} patches/s (batch 8, "
              "channels_last)", flush=True)
    return rows


def train_patches_per_second(arch: str | VggConfig, batch: int, *, channels_last: bool,
                             min_seconds: float) -> float:
    """Training throughput (forward, cross-entropy, backward, Adam step) on the CPU."""
    model = build_vgg(arch).train()
    x = torch.rand(batch, 1, SIZE, SIZE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()

    step()
    started, n = time.perf_counter(), 0
    while True:
        step()
        n += batch
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and n >= batch * 2:
            return n / elapsed


def bench_train(args: argparse.Namespace) -> dict:
    plain = train_patches_per_second("vgg16_slim", 8, channels_last=False, min_seconds=args.seconds * 2)
    fast = train_patches_per_second("vgg16_slim", 8, channels_last=True, min_seconds=args.seconds * 2)
    print(f"vgg16_slim training, batch 8: contiguous {plain:.2f} patches/s, channels_last {fast:.2f} patches/s "
          f"(ratio {fast / plain:.2f}x)", flush=True)
    return {"arch": "vgg16_slim", "batch": 8, "contiguous": plain, "channels_last": fast}


def bench_read(args: argparse.Namespace) -> dict:
    """One synthetic 3328 x 2560 mammogram read by the slim model, through the real catalog path."""
    from models.checkpoint import SHIPPED_DEMO, base_meta, load_checkpoint, save_checkpoint
    from models.inference import read_mammogram
    from workspace.base.catalog import open_catalog
    from workspace.base.config import Workspace
    from workspace.data import ingest, synth

    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.open(Path(tmp) / "ws")
        db = open_catalog(ws)
        plan = synth.plan_patient(0, 1)
        image = synth.make_image(plan, "LCC")
        path = ws.dicom_dir / "bench.dcm"
        synth.write_dicom(path, plan, image)
        image_id = ingest.register_dicom(ws, db, path, dataset="bench", birads=image.birads)
        if SHIPPED_DEMO.is_file():
            model_path, which = SHIPPED_DEMO, "shipped demo weights"
        else:
            model_path, which = Path(tmp) / "slim.pt", "random weights"
            save_checkpoint(model_path, build_vgg("vgg16_slim"), base_meta("vgg16_slim"))
        loaded = load_checkpoint(model_path, "cpu")
        first = read_mammogram(ws, image_id, loaded)
        second = read_mammogram(ws, image_id, loaded)
        without_maps = read_mammogram(ws, image_id, loaded, keep_maps=False, stride=SIZE // 2)
        t = time.perf_counter()
        pixels = ingest.load_model_pixels(ws, db["images"].get(image_id))
        load_s = time.perf_counter() - t
    result = {"image": f"{image.stored.shape[0]} x {image.stored.shape[1]}", "model": which,
              "patches": len(first.scores), "first_read_s": first.seconds, "cached_read_s": second.seconds,
              "pixel_load_s": load_s, "overlapping_no_maps_s": without_maps.seconds,
              "overlapping_patches": len(without_maps.scores),
              "maps_mb": first.maps.nbytes / 1e6 if first.maps is not None else 0.0}
    print(f"whole mammogram {result['image']} ({which}): {result['patches']} tissue patches, first read "
          f"{first.seconds:.2f} s (of which pixel load {load_s:.2f} s), cached read {second.seconds * 1000:.1f} ms, "
          f"maps kept {result['maps_mb']:.1f} MB; stride 256 without maps: {result['overlapping_patches']} patches "
          f"in {without_maps.seconds:.2f} s", flush=True)
    del pixels
    return result


def bench_gpu(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    print(f"GPU: {name}", flush=True)
    torch.backends.cudnn.benchmark = True
    rows = []
    model = build_vgg("vgg16_1ch").to(device).eval()
    for batch in (1, 8, 32):
        row = {"arch": "vgg16_1ch", "device": name, "batch": batch}
        row["eager_fp32"] = patches_per_second(model, batch, device=device, mode="eager", min_seconds=args.seconds)
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            row[f"channels_last_{label}"] = patches_per_second(model, batch, device=device, mode="fast",
                                                               min_seconds=args.seconds, dtype=dtype)
        rows.append(row)
        print(f"vgg16_1ch batch {batch:2d}: eager fp32 {row['eager_fp32']:8.1f}  channels_last fp32 "
              f"{row['channels_last_fp32']:8.1f}  bf16 {row['channels_last_bf16']:8.1f}  fp16 "
              f"{row['channels_last_fp16']:8.1f} patches/s  (bf16 {row['channels_last_bf16'] / row['eager_fp32']:.2f}x "
              "eager fp32)", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--seconds", type=float, default=4.0, help="minimum seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="skip vgg16_1ch at batch 8 on the CPU")
    parser.add_argument("--skip-cpu", action="store_true", help="only the read and GPU parts")
    parser.add_argument("--skip-read", action="store_true")
    parser.add_argument("--widths", action="append", default=[], metavar="W1,W2,W3,W4,W5",
                        help="also measure a slim-style network with these block widths (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    os.environ.setdefault("MAMMO_QUIET", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} CPU threads, load average {load[0]:.2f} {load[1]:.2f}",
          flush=True)
    out: dict = {"torch": torch.__version__, "threads": args.threads, "load_average": load}
    if not args.skip_cpu:
        out["cpu"] = bench_cpu(args)
    if not args.skip_cpu:
        out["train"] = bench_train(args)
    if args.widths:
        out["widths"] = bench_widths(args)
    if not args.skip_read:
        out["read"] = bench_read(args)
    if torch.cuda.is_available():
        out["gpu"] = bench_gpu(args)
    else:
        print("no GPU here: the bf16/fp16 vgg16_1ch part runs when torch.cuda.is_available()")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
