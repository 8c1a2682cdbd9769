"""Measurements behind the kernel's time projection and the slice-stride option.

    python -m csfd.kernel.benchmark throughput --config configs/sample.yaml [--backbone B --image-size S]
    python -m csfd.kernel.benchmark stride --config configs/sample.yaml [--strides 1 2 3 4]

`throughput` times the decode of real CT slices (csfd.dicom_io.read_slice through the window
and resize of the prepare config) and the slice models of one fold (vertebra and fracture,
random weights, csfd.inference.predict_volume), then projects the kernel's time.
`stride` scores the run's out-of-fold slice predictions thinned to every k-th slice and
interpolated back, exactly what predict.slice_stride does at test time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from csfd.config import ExperimentConfig, load_config
from csfd.constants import VERTEBRAE
from csfd.inference import FoldModels, interpolate_positions, predict_volume, strided_positions
from csfd.models import create_slice_model, to_device

logger = logging.getLogger(__name__)

VALUE_COLUMNS = [f"vis_{v}" for v in VERTEBRAE] + [f"frac_{v}" for v in VERTEBRAE]


def time_decode(paths: list[Path], config: ExperimentConfig, repeats: int = 5) -> float:
    """Return the mean seconds to read one slice and turn it into a prepared uint8 image."""
    from csfd.dicom_io import read_slice
    from csfd.volume import prepare_window, slice_transform

    transform, window = slice_transform(config.prepare), prepare_window(config.prepare)
    transform(read_slice(paths[0], window=window).pixels)  # warm-up: imports and decoder plugins
    started = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            transform(read_slice(path, window=window).pixels)
    return (time.perf_counter() - started) / (repeats * len(paths))


def time_models(config: ExperimentConfig, n_slices: int = 64, batch_size: int = 32, repeats: int = 2,
                device: torch.device | None = None) -> float:
    """Return the mean seconds per slice for one fold's two models (random weights) on `device`."""
    device = device or torch.device("cpu")
    models = []
    for model_config, outputs in ((config.vertebra, len(VERTEBRAE)), (config.fracture, 2 * len(VERTEBRAE))):
        model = create_slice_model(model_config.backbone, 2 * model_config.context_slices + 1, outputs, "")
        models.append(to_device(model, device).eval())
    fold = FoldModels(0, config, *models)
    size = config.prepare.image_size
    volume = np.random.default_rng(0).integers(0, 256, (n_slices, size, size), dtype=np.uint8)
    predict_volume(volume[: min(8, n_slices)], [fold], batch_size, device)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        predict_volume(volume, [fold], batch_size, device)
    return (time.perf_counter() - started) / (repeats * n_slices)


def project_hours(decode_s: float, model_s: float, folds: int, studies: int = 1500, slices: int = 350) -> dict[str, float]:
    """Project the prediction time in hours: decode overlapped with the models (prefetch) and in turn."""
    total = studies * slices
    return {
        "overlapped_h": total * max(decode_s, model_s * folds) / 3600,
        "sequential_h": total * (decode_s + model_s * folds) / 3600,
    }


def thin_slices(slices: pd.DataFrame, stride: int) -> pd.DataFrame:
    """Keep every `stride`-th slice of each study (and its last) and interpolate the others back."""
    frames = []
    for _, study in slices.sort_values(["StudyInstanceUID", "position_index"]).groupby("StudyInstanceUID", sort=False):
        n = len(study)
        positions = strided_positions(n, stride)
        values = study[VALUE_COLUMNS].to_numpy(dtype=float)
        study = study.copy()
        study[VALUE_COLUMNS] = interpolate_positions(values[positions], positions, n)
        frames.append(study)
    return pd.concat(frames, ignore_index=True)


def stride_scores(config: ExperimentConfig, strides: list[int]) -> pd.DataFrame:
    """Return the per-study and flat OOF scores of the aggregation and the stacker at each stride."""
    from csfd.features import aggregate_predictions, build_features
    from csfd.folds import read_folds
    from csfd.metric import competition_score
    from csfd.stack import _study_info_from_cache, predict_stacker

    folds = read_folds(Path(config.paths.folds_csv)).set_index("StudyInstanceUID")["fold"]
    fold_ids = [int(k) for k in sorted(folds.unique()) if (config.run_dir(int(k)) / "oof_slices.csv").is_file()]
    if not fold_ids:
        raise FileNotFoundError(f"no oof_slices.csv under {config.run_dir()}; train at least one fold first")
    if len(fold_ids) < folds.nunique():
        logger.warning("Only folds %s have out-of-fold predictions; scoring their studies only", fold_ids)
    slices = pd.concat(
        [pd.read_csv(config.run_dir(k) / "oof_slices.csv", dtype={"StudyInstanceUID": str}) for k in fold_ids],
        ignore_index=True,
    )
    labels = pd.read_csv(Path(config.paths.data_dir) / "train.csv", dtype={"StudyInstanceUID": str})
    labels = labels[labels["StudyInstanceUID"].isin(slices["StudyInstanceUID"])]
    study_info = _study_info_from_cache(config)
    stack_dir = config.run_dir() / "stack"
    rows = []
    for stride in strides:
        thinned = thin_slices(slices, stride)
        predicted = sum(len(strided_positions(n, stride)) for n in slices.groupby("StudyInstanceUID").size())
        row = {"stride": stride, "model_slices_share": predicted / len(slices)}
        aggregate = competition_score(labels, aggregate_predictions(thinned))
        row.update({"aggregate_per_study": aggregate["per_study"], "aggregate_flat": aggregate["flat"]})
        if (stack_dir / "stacker.json").is_file() and len(fold_ids) == folds.nunique():
            features = build_features(thinned, study_info)
            stacked = competition_score(labels, predict_stacker(features, stack_dir, "stacker", fold_of=folds))
            row.update({"stacker_per_study": stacked["per_study"], "stacker_flat": stacked["flat"]})
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    from csfd.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m csfd.kernel.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("throughput", "stride"))
    parser.add_argument("--config", default="configs/sample.yaml", help="experiment YAML (default: %(default)s)")
    parser.add_argument("--backbone", help="throughput: backbone of both models instead of the config's")
    parser.add_argument("--image-size", type=int, help="throughput: prepare and model image size in pixels")
    parser.add_argument("--slices", type=int, default=64, help="throughput: slices per timed volume (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="throughput: folds of the projection (default: %(default)s)")
    parser.add_argument("--dicom", nargs="+", type=Path, help="throughput: DICOM files whose decode is timed")
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 2, 3, 4], help="stride: values to score")
    parser.add_argument("overrides", nargs="*", metavar="KEY=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    config = load_config(args.config, args.overrides)

    if args.what == "stride":
        print(stride_scores(config, args.strides).to_string(index=False, float_format="%.4f"))
        return 0

    if args.backbone or args.image_size:
        size = args.image_size or config.prepare.image_size
        models = {
            name: dataclasses.replace(getattr(config, name), backbone=args.backbone or getattr(config, name).backbone,
                                      image_size=size)
            for name in ("vertebra", "fracture")
        }
        config = dataclasses.replace(config, prepare=dataclasses.replace(config.prepare, image_size=size), **models)
    model_s = time_models(config, n_slices=args.slices, batch_size=config.predict.batch_size)
    result = {
        "backbone": config.fracture.backbone,
        "image_size": config.fracture.image_size,
        "torch_threads": torch.get_num_threads(),
        "model_s_per_slice_per_fold": model_s,
    }
    if args.dicom:
        decode_s = time_decode(args.dicom, config)
        result["decode_s_per_slice"] = decode_s
        result.update(project_hours(decode_s, model_s, args.folds))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
