"""Benchmark the training loader against the model, and inference end to end, on the CPU.

For each setup (a backbone at an input size, with a config's fracture-model settings), side
by side in one run:

- loader slices/s: SliceStackDataset with augmentation through csfd.trainer.make_loader, with
  the config's batch size and worker count, over a synthetic prepared cache in a temporary
  folder (random uint8 volumes in the cache layout that StudyCache reads);
- model slices/s: one training step (forward, weighted BCE, backward, AdamW step) and one
  inference forward, random weights, random input;
- the loader / model ratio;
- inference of one 350-slice study through csfd.inference.predict_volume, with fold models
  loaded from a run folder written here, against the bare forward of the same models on the
  same slices;
- peak memory, and forward FLOPs from torch.utils.flop_counter.FlopCounterMode.

A GPU projection (an estimate, not a measurement) scales the measured FLOPs and published GPU
figures; see `project_gpu`. Run with `make bench` or `python -m benchmarks.bench_speed --help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    CpuMeter,
    build_synthetic_cache,
    format_table,
    load_average,
    machine_info,
    peak_rss_mib,
    wait_for_quiet_machine,
    write_results,
)

logger = logging.getLogger("benchmarks.bench_speed")

N_OUTPUTS_FRACTURE = 14
N_OUTPUTS_VERTEBRA = 7
STUDY_SLICES = 350
TARGET_LOADER_VS_MODEL = 2.0
TARGET_END_TO_END_OVERHEAD = 0.10


@dataclass(frozen=True)
class Setup:
    """One benchmarked configuration: a config file, overrides, and the batch sizes used on the CPU."""

    name: str
    config: str
    overrides: tuple[str, ...]
    cache_size: int  # image size of the synthetic cache (prepare.image_size)
    train_batch: int  # batch of the timed training steps
    infer_batch: int  # batch of the timed inference forwards and of predict_volume


SETUPS = {
    "sample": Setup("sample", "configs/sample.yaml", (), 96, 32, 64),
    "b0-256": Setup("b0-256", "configs/default.yaml", ("vertebra.image_size=256", "fracture.image_size=256"), 384, 8, 32),
    "b0-384": Setup("b0-384", "configs/default.yaml", (), 384, 8, 32),
}


# ---------------------------------------------------------------------------------------------
# GPU projection (an estimate)

# Published figures. T4: 65.13 TFLOPS FP16 tensor, 320 GB/s (sysrqmts.com/en/gpus/nvidia/tesla/t4).
# P100 PCIe 16 GB: 18.7 TFLOPS FP16 (tech4gamers.com Tesla P100 table), 732 GB/s (microway.com
# "Tesla P100 PCI-E 16GB" article). RTX 3090: 142 TFLOPS FP16 tensor, 936 GB/s (specification
# table on holynerdvana.blogspot.com, "Nvidia GeForce RTX 3090 Specifications").
GPUS = {
    "T4": {"fp16_tflops": 65.13, "bandwidth_gbs": 320.0},
    "P100-PCIE-16GB": {"fp16_tflops": 18.7, "bandwidth_gbs": 732.0},
}
REFERENCE_GPU = {"name": "RTX 3090", "fp16_tflops": 142.0, "bandwidth_gbs": 936.0}
# timm's own measurements on the RTX 3090 with AMP, NCHW, PyTorch 1.12, 224 x 224 input, 1000
# classes: huggingface/pytorch-image-models results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv
# and results/benchmark-infer-amp-nchw-pt112-cu113-rtx3090.csv (samples per second).
REFERENCE_SAMPLES_PER_S = {
    "tf_efficientnet_b0": {"train": 1395.32, "infer": 5892.32},
    "mobilenetv3_small_050": {"train": 7406.47, "infer": 43905.96},
}
REFERENCE_SIZE = 224
# Training FLOPs per image as a multiple of the forward: the backward computes gradients of
# the input and of the weights, each about one forward. FlopCounterMode's own backward count
# is not used: in torch 2.14 it counts the backward of a grouped (depthwise) convolution as a
# dense convolution, 64 times the forward for 64 groups.
TRAIN_FLOPS_PER_FORWARD = 3.0


def forward_gflops(backbone: str, in_chans: int, num_outputs: int, size: int) -> float:
    """Count the forward FLOPs of one image with torch.utils.flop_counter (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from csfd.models import create_slice_model

    model = create_slice_model(backbone, in_chans, num_outputs).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, size, size))
    return counter.get_total_flops() / 1e9


def project_gpu(backbone: str, forward_gflops_at_size: float, forward_gflops_reference: float) -> list[dict]:
    """Estimate GPU slices/s for training and inference in two ways; both are estimates.

    1. Peak x utilisation: the GPU's FP16 peak times the utilisation that timm's RTX 3090
       measurement of the same backbone reaches (its achieved FLOP/s over the 3090's FP16 peak).
    2. Bandwidth scaling: timm's RTX 3090 samples/s times (GPU bandwidth / 3090 bandwidth) times
       (FLOPs at 224 / FLOPs at our size). This holds when memory traffic bounds the model, as
       it tends to for depthwise convolutions and batch norm.
    """
    reference = REFERENCE_SAMPLES_PER_S.get(backbone)
    if reference is None:
        return []
    rows = []
    for mode, flops_per_forward in (("train", TRAIN_FLOPS_PER_FORWARD), ("infer", 1.0)):
        reference_flops = forward_gflops_reference * flops_per_forward * 1e9
        achieved = reference[mode] * reference_flops
        utilisation = achieved / (REFERENCE_GPU["fp16_tflops"] * 1e12)
        flops = forward_gflops_at_size * flops_per_forward * 1e9
        for gpu, spec in GPUS.items():
            by_peak = spec["fp16_tflops"] * 1e12 * utilisation / flops
            by_bandwidth = (reference[mode] * spec["bandwidth_gbs"] / REFERENCE_GPU["bandwidth_gbs"]
                            * forward_gflops_reference / forward_gflops_at_size)
            rows.append({"gpu": gpu, "mode": mode, "utilisation": utilisation, "by_peak": by_peak,
                         "by_bandwidth": by_bandwidth, "low": min(by_peak, by_bandwidth), "high": max(by_peak, by_bandwidth)})
    return rows


# ---------------------------------------------------------------------------------------------
# Loader


def measure_loader(cache_dir: Path, model_config, items: int, seed: int) -> dict:
    """Iterate a shuffled, augmented training loader over `items` slices; return its rates.

    The first batch waits for worker start-up, so the steady rate counts from its arrival.
    """
    from csfd.cache import StudyCache
    from csfd.data import SliceStackDataset, StudyVolumes
    from csfd.trainer import make_loader

    cache = StudyCache(cache_dir, "train")
    slices = cache.slices
    rng = np.random.default_rng(seed)
    rows = slices.iloc[np.sort(rng.choice(len(slices), size=min(items, len(slices)), replace=False))]
    uids = cache.study_uids
    study_index = rows["StudyInstanceUID"].map({uid: i for i, uid in enumerate(uids)}).to_numpy(np.int64)
    dataset = SliceStackDataset(
        StudyVolumes(cache, uids), study_index, rows["position_index"].to_numpy(np.int64),
        np.zeros((len(rows), N_OUTPUTS_FRACTURE), dtype=np.float32), None,
        model_config.context_slices, model_config.image_size, model_config.augment, seed,
    )
    loader = make_loader(dataset, model_config.batch_size, True, model_config.num_workers, seed)
    start = time.perf_counter()
    first_arrival, first_size, delivered = None, 0, 0
    with CpuMeter() as meter:  # the workers exit, and count as waited-for children, when the loop ends
        for images, _, _ in loader:
            if first_arrival is None:
                first_arrival, first_size = time.perf_counter(), len(images)
            delivered += len(images)
        end = time.perf_counter()
    if delivered != len(dataset):
        raise RuntimeError(f"the loader delivered {delivered} items, expected {len(dataset)}")
    return {
        "items": delivered,
        "batch_size": model_config.batch_size,
        "workers": model_config.num_workers,
        "first_batch_s": first_arrival - start,
        "total_rate": delivered / (end - start),
        "steady_rate": (delivered - first_size) / (end - first_arrival),
        "cores": meter.cores_used,
        "input_shape": tuple(images.shape[1:]),
    }


# ---------------------------------------------------------------------------------------------
# Model


def measure_training(model, in_chans: int, size: int, batch: int, steps: int, seed: int) -> tuple[float, float]:
    """Return (slices/s, cores used) of training steps (forward, weighted BCE, backward, AdamW) after one untimed step."""
    from csfd.trainer import weighted_bce

    generator = torch.Generator().manual_seed(seed)
    # channels_last, the layout csfd.models.to_device gives every stage.
    images = torch.rand(batch, in_chans, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(batch, N_OUTPUTS_FRACTURE, generator=generator) > 0.5).float()
    weights = torch.ones_like(targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        loss = weighted_bce(model(images), targets, weights)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with CpuMeter() as meter:
        for _ in range(steps):
            step()
    return batch * steps / meter.wall_s, meter.cores_used


@torch.inference_mode()
def measure_inference(model, in_chans: int, size: int, batch: int, batches: int, seed: int) -> tuple[float, float]:
    """Return (slices/s, cores used) of inference forwards after one untimed forward."""
    generator = torch.Generator().manual_seed(seed)
    # channels_last, the layout csfd.models.to_device gives every stage.
    images = torch.rand(batch, in_chans, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    model.eval()
    model(images)
    with CpuMeter() as meter:
        for _ in range(batches):
            model(images)
    return batch * batches / meter.wall_s, meter.cores_used


# ---------------------------------------------------------------------------------------------
# Inference per study


def write_run_folder(run_root: Path, config, seed: int) -> None:
    """Write fold0 with config.yaml and random-weight vertebra.pt and fracture.pt, as training would."""
    from csfd.config import save_config
    from csfd.models import create_slice_model, save_weights

    folder = run_root / "fold0"
    folder.mkdir(parents=True, exist_ok=True)
    save_config(config, folder / "config.yaml")
    torch.manual_seed(seed)
    for name, section, outputs in (("vertebra", config.vertebra, N_OUTPUTS_VERTEBRA),
                                   ("fracture", config.fracture, N_OUTPUTS_FRACTURE)):
        in_chans = 2 * section.context_slices + 1
        model = create_slice_model(section.backbone, in_chans, outputs)
        save_weights(model, folder / f"{name}.pt", config.hash(), {"in_chans": in_chans, "num_outputs": outputs})


@torch.inference_mode()
def bare_forward_seconds(fold_models, volume: np.ndarray, batch: int) -> float:
    """Time only the models' forwards on the inputs that predict_volume would build, prebuilt here.

    batch_model_input builds the same values as predict_volume's per-slice stacking (tested in
    tests/test_model_input.py).
    """
    from csfd.data import batch_model_input

    seconds = 0.0
    for models in fold_models:
        for model, section in ((models.vertebra, models.config.vertebra), (models.fracture, models.config.fracture)):
            batches = [torch.from_numpy(batch_model_input(volume, np.arange(first, min(first + batch, len(volume))),
                                                          section.context_slices, section.image_size))
                       .contiguous(memory_format=torch.channels_last)
                       for first in range(0, len(volume), batch)]
            model(batches[0])  # untimed: first-call set-up of the CPU kernels
            start = time.perf_counter()
            for images in batches:
                torch.sigmoid(model(images).float())
            seconds += time.perf_counter() - start
    return seconds


@torch.inference_mode()
def batched_input_seconds(fold_models, volume: np.ndarray, batch: int) -> float:
    """Time predict_volume's loop with csfd.data.batch_model_input in place of per-slice stacking.

    A candidate for csfd.inference, measured here: same models, batches and sigmoid outputs.
    """
    from csfd.data import batch_model_input

    start = time.perf_counter()
    for models in fold_models:
        for model, section in ((models.vertebra, models.config.vertebra), (models.fracture, models.config.fracture)):
            for first in range(0, len(volume), batch):
                positions = np.arange(first, min(first + batch, len(volume)))
                nhwc = batch_model_input(volume, positions, section.context_slices, section.image_size, channels_last=True)
                images = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
                torch.sigmoid(model(images).float()).numpy()
    return time.perf_counter() - start


def measure_study_inference(run_root: Path, cache_size: int, batch: int, n_slices: int, seed: int) -> dict:
    """Time predict_volume on one study of `n_slices` slices against the bare forward of the same models."""
    from csfd.inference import load_fold_models, predict_volume

    fold_models = load_fold_models(run_root, (0,))
    volume = np.random.default_rng(seed).integers(0, 256, size=(n_slices, cache_size, cache_size), dtype=np.uint8)
    predict_volume(volume[:batch], fold_models, batch)  # untimed warm-up
    with CpuMeter() as meter:
        visibility, fracture = predict_volume(volume, fold_models, batch)
    end_to_end = meter.wall_s
    if visibility.shape != (n_slices, N_OUTPUTS_VERTEBRA) or fracture.shape != (n_slices, N_OUTPUTS_VERTEBRA):
        raise RuntimeError(f"predict_volume returned shapes {visibility.shape} and {fracture.shape}")
    bare = bare_forward_seconds(fold_models, volume, batch)
    batched = batched_input_seconds(fold_models, volume, batch)
    return {"end_to_end_s": end_to_end, "end_to_end_cores": meter.cores_used, "bare_forward_s": bare,
            "ratio": end_to_end / bare,
            "batched_input_s": batched, "batched_ratio": batched / bare}


# ---------------------------------------------------------------------------------------------
# One setup


def run_setup(setup: Setup, work: Path, args: argparse.Namespace) -> dict:
    from csfd.config import load_config
    from csfd.models import create_slice_model, to_device

    config = load_config(setup.config, list(setup.overrides))
    config = dataclasses.replace(config, paths=dataclasses.replace(config.paths, runs_dir=str(work / "runs")))
    fracture = config.fracture
    in_chans = 2 * fracture.context_slices + 1
    result = {"setup": setup.name, "backbone": fracture.backbone, "image_size": fracture.image_size,
              "cache_size": setup.cache_size, "load_before": load_average()[0]}
    logger.info("%s: %s at %d px, cache at %d px", setup.name, fracture.backbone, fracture.image_size, setup.cache_size)

    cache_dir = work / f"cache-{setup.cache_size}"
    if not (cache_dir / "train" / "slices.csv").is_file():
        build_synthetic_cache(cache_dir, args.cache_studies, args.cache_slices, setup.cache_size)
    loader = measure_loader(cache_dir, fracture, args.loader_items, config.seed)
    result.update({f"loader_{key}": value for key, value in loader.items()})

    torch.manual_seed(config.seed)
    model = to_device(create_slice_model(fracture.backbone, in_chans, N_OUTPUTS_FRACTURE), torch.device("cpu"))
    result["train_batch"] = setup.train_batch
    result["train_rate"], result["train_cores"] = measure_training(
        model, in_chans, fracture.image_size, setup.train_batch, args.train_steps, config.seed)
    result["infer_batch"] = setup.infer_batch
    result["infer_rate"], result["infer_cores"] = measure_inference(
        model, in_chans, fracture.image_size, setup.infer_batch, args.infer_batches, config.seed)
    del model
    result["loader_vs_train"] = loader["steady_rate"] / result["train_rate"]

    run_root = work / "runs" / setup.name
    write_run_folder(run_root, dataclasses.replace(config, name=setup.name), config.seed)
    result.update({f"study_{key}": value for key, value in
                   measure_study_inference(run_root, setup.cache_size, setup.infer_batch, args.study_slices,
                                           config.seed).items()})

    result["forward_gflops"] = forward_gflops(fracture.backbone, in_chans, N_OUTPUTS_FRACTURE, fracture.image_size)
    reference_gflops = forward_gflops(fracture.backbone, 3, 1000, REFERENCE_SIZE)
    result["gpu"] = project_gpu(fracture.backbone, result["forward_gflops"], reference_gflops)
    result["peak_rss_mib"] = peak_rss_mib()
    result["load_after"] = load_average()[0]
    return result


# ---------------------------------------------------------------------------------------------
# Report


def summary_rows(results: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    speed_rows, gpu_rows, target_rows = [], [], []
    for r in results:
        speed_rows.append({
            "setup": r["setup"], "model": f"{r['backbone']} @ {r['image_size']}", "cache px": r["cache_size"],
            "loader workers": r["loader_workers"], "loader batch": r["loader_batch_size"],
            "loader slices/s": r["loader_steady_rate"], "first batch s": r["loader_first_batch_s"],
            "loader cores": r["loader_cores"], "study e2e cores": r["study_end_to_end_cores"],
            "train batch": r["train_batch"], "train slices/s": r["train_rate"], "train cores": r["train_cores"],
            "infer batch": r["infer_batch"], "infer slices/s": r["infer_rate"], "infer cores": r["infer_cores"],
            "loader / train": r["loader_vs_train"],
            "study e2e s": r["study_end_to_end_s"], "study bare fwd s": r["study_bare_forward_s"],
            "e2e / bare": r["study_ratio"], "candidate s": r["study_batched_input_s"],
            "candidate / bare": r["study_batched_ratio"], "fwd GFLOPs": r["forward_gflops"],
            "peak RSS MiB": r["peak_rss_mib"]["self"], "largest worker MiB": r["peak_rss_mib"]["largest_child"],
            "load before": r["load_before"], "load after": r["load_after"],
        })
        target_rows.append({"setup": r["setup"], "target": "loader / model training (CPU)", "wanted": f">= {TARGET_LOADER_VS_MODEL}",
                            "measured": r["loader_vs_train"], "met": r["loader_vs_train"] >= TARGET_LOADER_VS_MODEL})
        target_rows.append({"setup": r["setup"], "target": "predict_volume / bare forward (CPU)",
                            "wanted": f"<= {1 + TARGET_END_TO_END_OVERHEAD:.2f}", "measured": r["study_ratio"],
                            "met": r["study_ratio"] <= 1 + TARGET_END_TO_END_OVERHEAD})
        for g in r["gpu"]:
            row = {"setup": r["setup"], "gpu": g["gpu"], "mode": g["mode"], "3090 utilisation": g["utilisation"],
                   "by peak x utilisation": g["by_peak"], "by bandwidth": g["by_bandwidth"]}
            if g["mode"] == "train":
                row["loader / GPU train (low..high)"] = (f"{r['loader_steady_rate'] / g['high']:.2f}.."
                                                          f"{r['loader_steady_rate'] / g['low']:.2f}")
            gpu_rows.append(row)
    return speed_rows, gpu_rows, target_rows


SPEED_COLUMNS = ["setup", "model", "cache px", "loader workers", "loader batch", "loader slices/s", "first batch s",
                 "loader cores",
                 "train batch", "train slices/s", "train cores", "infer batch", "infer slices/s", "infer cores",
                 "loader / train"]
STUDY_COLUMNS = ["setup", "model", "infer batch", "study e2e s", "study e2e cores", "study bare fwd s", "e2e / bare",
                 "candidate s",
                 "candidate / bare", "fwd GFLOPs",
                 "peak RSS MiB", "largest worker MiB", "load before", "load after"]
GPU_COLUMNS = ["setup", "gpu", "mode", "3090 utilisation", "by peak x utilisation", "by bandwidth",
               "loader / GPU train (low..high)"]


def print_report(payload: dict) -> None:
    machine = payload["machine"]
    print(f"\nMachine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
          f"torch threads {machine['torch_threads']}; {machine['date']}; load average before "
          f"{tuple(round(v, 2) for v in machine['load_average_before'])}, after "
          f"{tuple(round(v, 2) for v in machine['load_average_after'])}")
    print("\nLoader vs model on this CPU (slices/s):\n")
    print(format_table(payload["speed"], SPEED_COLUMNS))
    print(f"\nInference of one {payload['settings']['study_slices']}-slice study, vertebra + fracture model "
          "of one fold (seconds):\n")
    print(format_table(payload["speed"], STUDY_COLUMNS))
    print("\ne2e: csfd.inference.predict_volume. bare fwd: the same forwards on prebuilt inputs. candidate: "
          "predict_volume's loop with csfd.data.batch_model_input building each batch.")
    print("\nTargets:\n")
    print(format_table(payload["targets"], ["setup", "target", "wanted", "measured", "met"]))
    if payload["gpu"]:
        print("\nGPU projection, slices/s (ESTIMATE from published figures, not measured):\n")
        print(format_table(payload["gpu"], GPU_COLUMNS))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=list(SETUPS),
                        help="setups to run (default: all)")
    parser.add_argument("--loader-items", type=int, default=1024, help="slices the loader delivers per setup (default 1024)")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps per setup (default 3)")
    parser.add_argument("--infer-batches", type=int, default=3, help="timed inference batches per setup (default 3)")
    parser.add_argument("--cache-studies", type=int, default=4, help="studies in the synthetic cache (default 4)")
    parser.add_argument("--cache-slices", type=int, default=350, help="slices per synthetic study (default 350)")
    parser.add_argument("--study-slices", type=int, default=STUDY_SLICES,
                        help=f"slices of the study that predict_volume runs on (default {STUDY_SLICES})")
    parser.add_argument("--max-load", type=float, default=0.7,
                        help="wait for a 1-minute load average below this before measuring (default 0.7)")
    parser.add_argument("--max-wait-min", type=float, default=0.0,
                        help="minutes to wait for that load at most; 0 measures at once (default 0)")
    parser.add_argument("--output", type=Path, default=Path("output/bench"), help="folder for speed.json and speed.csv")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("csfd").setLevel(logging.WARNING)
    args = parse_args(argv)
    wait_for_quiet_machine(args.max_load, args.max_wait_min * 60)
    info = machine_info()
    info["torch_threads"] = torch.get_num_threads()
    info["load_average_before"] = load_average()
    work = Path(tempfile.mkdtemp(prefix="csfd-bench-speed-"))
    started = time.perf_counter()
    try:
        results = [run_setup(SETUPS[name], work, args) for name in args.setups]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["load_average_after"] = load_average()
    info["seconds"] = round(time.perf_counter() - started, 1)
    speed, gpu, targets = summary_rows(results)
    payload = {"machine": info, "command": " ".join(sys.argv), "settings": {k: str(v) for k, v in vars(args).items()},
               "setups": {name: dataclasses.asdict(SETUPS[name]) for name in args.setups},
               "speed": speed, "gpu": gpu, "targets": targets, "raw": results}
    print_report(payload)
    rows = [{"table": name, **row} for name in ("speed", "targets", "gpu") for row in payload[name]]
    json_path, csv_path = write_results("speed", payload, rows, args.output)
    print(f"\nWrote {json_path} and {csv_path} ({info['seconds']} s)")


if __name__ == "__main__":
    main()
