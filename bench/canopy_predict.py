"""Benchmark tiled canopy prediction: pipeline throughput vs the model-only floor, and peak memory vs raster size.

For each size (default 2,000^2, 20,000^2, and 2,000 wide x 20,000 tall to separate the effect of width from that
of area) a synthetic 3-band uint8 GeoTIFF is written window by window (never held in memory), then a fresh
subprocess runs :func:`geodino.predict.predict_raster` on it and reports its peak RSS (``ru_maxrss``), so the sizes
do not share a process and the memory numbers are comparable. In the same subprocess the model alone is timed on
the same tiles already in memory (a sample of the tile batches, repeated), which gives the floor the full pipeline
(reads, normalisation, blending, writing, COG conversion) is compared to. ``peak_rss_before_cog_mb`` is the peak
at the end of tiling and blending, before the pipeline's COG conversion starts.

The I/O floor is measured in the same subprocess too: GDAL windowed reads of every input pixel once, and the
pipeline's own output rows (read back untimed) stored as the same float32 partial output strip by strip and
converted to a COG by the pipeline's writers (``pipeline_vs_io_floor`` = pipeline throughput / floor throughput).
``--model null`` returns zeros at once, so the pipeline is timed without any model; several ``--num-workers``
values measure how it scales with the threads that normalise tiles. A warm-up on a small crop first spares both
timings one-off costs (GDAL drivers, PROJ, the model's first call). ``--model vits14`` is a random-init ViT-S/14
under a linear head (:func:`vits14`); ``pipeline_vs_model_only`` is then the share of the model's own speed the
whole pipeline keeps. The load average before and after is reported: on a shared machine, compare runs made under
similar load, or take the best of ``--repeat`` runs (``best_of_runs``: the shortest pipeline, floor and model
times over the runs, and their ratios; the best ratio of single runs would reward a floor that noise slowed).

Usage: ``python bench/canopy_predict.py [--sizes 2000 20000 2000x20000] [--model conv3x3|conv3x3x2|vits14|null]
[--num-workers 1 2 4] [--tile 256 ...]`` (a size is ``N`` for N x N or ``WIDTHxHEIGHT``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_input(path: Path, width: int, height: int, block: int = 512) -> None:
    """Write a ``width`` x ``height`` 3-band uint8 GeoTIFF with a canopy-like texture, one block row at a time."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32617",
        "transform": from_origin(400000, 4000000, 0.6, 0.6),
        "nodata": 255,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "zstd",
        "zstd_level": 1,
        "BIGTIFF": "IF_SAFER",
    }
    rng = np.random.default_rng(0)
    xx = np.arange(width, dtype=np.float32)[None, :]
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, height, block):
            h = min(block, height - row)
            yy = np.arange(row, row + h, dtype=np.float32)[:, None]
            crowns = 60 + 50 * np.sin(xx / 13.0) * np.cos(yy / 11.0) + rng.normal(0, 12, (h, width))
            bands = np.stack([crowns * 0.8, crowns, crowns * 0.6]).clip(0, 254).astype(np.uint8)
            dst.write(bands, window=Window(0, row, width, h))


def conv3x3() -> Any:
    """One fixed 3x3 convolution (3 -> 1 channels): about the cheapest model with a receptive field."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 1, 3, padding=1).eval()


def conv3x3_two_layers() -> Any:
    """3x3 conv (3 -> 8), ReLU, 3x3 conv (8 -> 1): about 3x the cost of :func:`conv3x3`."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 3, padding=1)
    ).eval()


def vits14(tile: int) -> Any:
    """ViT-S/14 (``core.models`` ``vit_small``, patch 14, random DINOv2 init) under geodino's linear canopy head in
    regression mode (the last block's patch and class tokens -> one 1x1 convolution -> bilinear resize to the
    pixels), as a :class:`geodino.model.CanopyModel`: its ``predict_batch`` is the ``model_fn`` the command line
    uses (zero padding to a multiple of 14, head, crop, clamp at 0 m). The weights are random, so the heights mean
    nothing, but the arithmetic is a real ViT-S/14 forward pass: the backbone is almost all of the cost; a DPT or
    bins head would only make the model slower and the pipeline's share smaller."""
    import torch

    from geodino.model import backbone_head_model, random_backbone
    from geodino.normalise import BandNormaliser

    torch.manual_seed(0)
    backbone, meta = random_backbone("vit_small", 14, tile)
    model = backbone_head_model(
        backbone,
        meta,
        "linear",
        {"embed_dim": backbone.embed_dim, "n_layers": 1, "mode": "regression"},
        layers=[backbone.n_blocks - 1],
        feature_norm=True,
        normaliser=BandNormaliser([127.5] * 3, [60.0] * 3),
        band_names=["red", "green", "blue"],
    )
    return model.predict_batch


MODELS = {"conv3x3": conv3x3, "conv3x3x2": conv3x3_two_layers, "vits14": vits14, "null": None}


def model_fn_for(name: str, tile: int = 256) -> Any:
    """The benchmark's model: a tiny convolution, ViT-S/14 (:func:`vits14`), or ``null`` (zeros at once) to time
    the pipeline alone."""
    import torch

    if name == "null":  # one tile of zeros, broadcast over the batch: no work and no memory per call
        zeros = torch.zeros(1, tile, tile)
        return lambda batch: {"height": zeros.expand(batch.shape[0], -1, -1)}
    if name == "vits14":
        return vits14(tile)
    net = MODELS[name]()

    def model_fn(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"height": torch.relu(net(batch)[:, 0]) * 10}

    return model_fn


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh process: pipeline, then the model-only floor; reports times and peak RSS."""
    import numpy as np
    import torch
    from rasterio.windows import Window

    import geodino.cog
    from geodino.normalise import BandNormaliser
    from geodino.predict import predict_raster
    from geodino.raster import RasterSource
    from geodino.tiling import TileGrid

    rss_after_imports = _rss_mb()
    model_fn = model_fn_for(args.model, args.tile)
    peaks: dict[str, float] = {}
    to_cog = geodino.cog.write_cog

    def write_cog_recording_peak(*a: Any, **k: Any) -> Any:
        peaks.setdefault("before_cog", _peak_rss_mb())  # the pipeline's tiling/blending phase is over
        return to_cog(*a, **k)

    normaliser = BandNormaliser([127.5] * 3, [60.0] * 3)
    out = Path(args.input).with_name(f"chm_{args.width}x{args.height}.tif")
    settings = {"tile": args.tile, "overlap": args.overlap, "batch_size": args.batch_size}
    settings.update(num_workers=args.num_workers[0], resume=False, progress=False)
    # Warm-up on a small crop, so neither the pipeline (timed first) nor the floor pays one-off costs (GDAL drivers,
    # PROJ's database, the model's first call) the other does not.
    crop = out.with_name("warmup_input.tif")
    write_crop(Path(args.input), crop, 2 * args.tile)
    with RasterSource(crop) as small:
        predict_raster(model_fn, small, normaliser, out.with_name("warmup.tif"), **settings)
    io_floor_seconds(crop, out.with_name("warmup.tif"), out.with_name("warmup_floor.tif"), args.tile)
    geodino.cog.write_cog = write_cog_recording_peak
    with RasterSource(args.input) as src:
        start, cpu_start = time.perf_counter(), time.process_time()
        predict_raster(model_fn, src, normaliser, out, **settings)
        pipeline_s = time.perf_counter() - start
        pipeline_cpu_s = time.process_time() - cpu_start
        peak_pipeline, hwm_pipeline = _peak_rss_mb(), _hwm_mb()
        grid = TileGrid(src.height, src.width, args.tile, args.overlap)
        sample = []
        for x in grid.cols[: args.batch_size * 4]:
            data, valid = src.read(Window(x, grid.rows[0], args.tile, args.tile))
            sample.append(normaliser(data, valid))
    batches = [
        torch.from_numpy(np.stack(sample[i : i + args.batch_size])) for i in range(0, len(sample), args.batch_size)
    ]
    with torch.inference_mode():
        model_fn(batches[0])  # warm-up
        tiles, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.floor_seconds or tiles < grid.n_tiles // 4 and tiles < 64:
            for batch in batches:
                model_fn(batch)
                tiles += batch.shape[0]
        per_tile = (time.perf_counter() - start) / tiles
    model_only_s = per_tile * grid.n_tiles
    megapixels = args.width * args.height / 1e6
    floor_cpu_start = time.process_time()
    floor_s = io_floor_seconds(Path(args.input), out, out.with_name("floor.tif"), args.tile)
    floor_cpu_s = time.process_time() - floor_cpu_start  # includes the untimed read-back of the pipeline's output
    return {
        "width": args.width,
        "height": args.height,
        "megapixels": megapixels,
        "tiles": grid.n_tiles,
        "pipeline_s": round(pipeline_s, 3),
        "pipeline_cpu_s": round(pipeline_cpu_s, 2),
        "pipeline_mpx_per_s": round(megapixels / pipeline_s, 3),
        "model_only_s_estimate": round(model_only_s, 3),
        "model_only_mpx_per_s": round(megapixels / model_only_s, 3),
        "pipeline_vs_model_only": round(model_only_s / pipeline_s, 3),
        "io_floor_s": round(floor_s, 3),
        "io_floor_cpu_s": round(floor_cpu_s, 2),
        "io_floor_mpx_per_s": round(megapixels / floor_s, 3),
        "pipeline_vs_io_floor": round(floor_s / pipeline_s, 3),
        "rss_after_imports_mb": round(rss_after_imports, 1),
        "peak_rss_mb": round(peak_pipeline, 1),
        "peak_rss_before_cog_mb": round(peaks.get("before_cog", float("nan")), 1),
        "vm_hwm_mb": round(hwm_pipeline, 1),
        "torch_threads": torch.get_num_threads(),
        "output_bytes": out.stat().st_size,
    }


def io_floor_seconds(input_path: Path, same_as: Path, out: Path, strip: int) -> float:
    """The I/O floor: GDAL windowed reads of every input pixel once (strips of ``strip`` rows), the same float32
    partial output written strip by strip, and its conversion to a COG, by the pipeline's own writers.

    The rows written are the pipeline's own output (read back from ``same_as``, untimed), so the floor compresses
    exactly what the pipeline compressed: zeros compress far faster than imagery, and writing the input band
    instead would make the floor slower than the pipeline's real writing work.
    """
    import numpy as np
    from rasterio.windows import Window

    from geodino.cog import create_partial, write_cog, write_rows
    from geodino.partial import remove_partial
    from geodino.raster import RasterSource

    partial = out.with_name(f".{out.name}.partial.tif")
    timed = 0.0
    with RasterSource(input_path) as src, rasterio_open(same_as) as pipeline_output:
        start = time.perf_counter()
        create_partial(partial, src, "float32")
        for row in range(0, src.height, strip):
            h = min(strip, src.height - row)
            src.read(Window(0, row, src.width, h))
            timed += time.perf_counter() - start
            rows = pipeline_output.read(1, window=Window(0, row, src.width, h)).astype(np.float32)  # untimed
            start = time.perf_counter()
            write_rows(partial, row, rows)
        write_cog(partial, out, out_dtype="float32", uint16_scale=100.0, tags={})
        timed += time.perf_counter() - start
    remove_partial(partial)
    out.unlink(missing_ok=True)
    return timed


def write_crop(source: Path, target: Path, size: int) -> None:
    """The top-left ``size`` x ``size`` pixels of ``source`` as a GeoTIFF with the same profile."""
    from rasterio.windows import Window

    with rasterio_open(source) as src:
        window = Window(0, 0, min(size, src.width), min(size, src.height))
        profile = dict(src.profile, width=window.width, height=window.height, transform=src.window_transform(window))
        profile.update(blockxsize=256, blockysize=256)
        with rasterio_open(target, "w", **profile) as dst:
            dst.write(src.read(window=window))


def rasterio_open(*args: Any, **kwargs: Any) -> Any:
    """``rasterio.open`` (imported here so the parent process stays stdlib-only)."""
    import rasterio

    return rasterio.open(*args, **kwargs)


def _size(text: str) -> tuple[int, int]:
    """``N`` -> (N, N); ``WIDTHxHEIGHT`` -> (WIDTH, HEIGHT)."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mb() -> float:
    """Peak RSS of this process image only (not inherited over exec, unlike ``ru_maxrss``)."""
    return _rss_mb("VmHWM")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_size, nargs="+", default=[(2000, 2000), (20000, 20000), (2000, 20000)])
    parser.add_argument("--model", choices=sorted(MODELS), default="conv3x3")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--num-workers", type=int, nargs="+", default=[1], help="reader threads; several (1 2 4) measure the scaling"
    )
    parser.add_argument("--floor-seconds", type=float, default=5.0, help="how long to time the model alone")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size and worker count (best reported too)")
    parser.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temporary directory)")
    parser.add_argument("--mode", choices=["run", "generate", "worker"], default="run", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "generate":
        make_input(Path(args.input), args.width, args.height)
        return
    if args.mode == "worker":
        print(json.dumps(worker(args)))
        return

    # This parent stays small (stdlib only) because Linux carries a process's peak RSS over fork and exec into the
    # child's ru_maxrss: generating inputs here would inflate the workers' numbers.
    os.environ.setdefault("DINOSCOPE_NO_PROGRESS", "1")
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = []
        for width, height in args.sizes:
            path = Path(tmp) / f"rgb_{width}x{height}.tif"
            common = [sys.executable, __file__, "--width", str(width), "--height", str(height), "--input", str(path)]
            start = time.perf_counter()
            subprocess.run([*common, "--mode", "generate"], check=True, cwd=REPO)
            generate_s = time.perf_counter() - start
            for run, workers in [(run, w) for run in range(args.repeat) for w in args.num_workers]:
                settings = {"--tile": args.tile, "--overlap": args.overlap, "--batch-size": args.batch_size}
                settings.update({"--num-workers": workers, "--floor-seconds": args.floor_seconds})
                cmd = [*common, "--mode", "worker", "--model", args.model]
                cmd += [str(part) for item in settings.items() for part in item]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result.update(generate_input_s=round(generate_s, 2), num_workers=workers, run=run)
                results.append(result)
            for f in Path(tmp).glob("*"):
                f.unlink()
    report = {
        "model": args.model,
        "tile": args.tile,
        "overlap": args.overlap,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "parent_peak_rss_mb": round(_peak_rss_mb(), 1),
        "results": results,
    }
    if args.repeat > 1:  # on a shared machine: each quantity's best (shortest) time over the runs, then the ratios
        best: dict[str, dict[str, float]] = {}
        for r in results:
            times = best.setdefault(f"{r['width']}x{r['height']}/{r['num_workers']}", {})
            for name in ("pipeline_s", "io_floor_s", "model_only_s_estimate"):
                times[name] = min(times.get(name, float("inf")), r[name])
        for times in best.values():
            times["pipeline_vs_io_floor"] = round(times["io_floor_s"] / times["pipeline_s"], 3)
            times["pipeline_vs_model_only"] = round(times["model_only_s_estimate"] / times["pipeline_s"], 3)
        report["best_of_runs"] = best
    if len(results) > 1:
        report["peak_rss_ratio_vs_first"] = [round(r["peak_rss_mb"] / results[0]["peak_rss_mb"], 3) for r in results]
        report["pixel_ratio_vs_first"] = [round(r["megapixels"] / results[0]["megapixels"], 1) for r in results]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
