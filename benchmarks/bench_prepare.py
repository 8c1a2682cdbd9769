"""Benchmark DICOM decoding and the prepare stage on real-format 512 x 512 CT slices.

Builds a benchmark data set in a temporary folder from one real slice: copies of it with
distinct ImagePositionPatient, InstanceNumber and SOPInstanceUID. One set keeps the source's
transfer syntax and its compressed pixel data unchanged (the default source is JPEG Lossless
SV1, 1.2.840.10008.1.2.4.70). The other set holds the same pixels decompressed to Explicit VR
Little Endian. Then it measures, side by side in one run:

- decode only: pydicom (with the pylibjpeg plugins), dicomsdl, and for JPEG Lossless the
  libjpeg-turbo decoder (imagecodecs) that read_slice uses for it, one process;
- csfd.dicom_io.read_slice per reader, and read_slice + window + resize (the per-slice work
  of the prepare stage);
- the prepare stage end to end (prepare_split: decode, HU, window, resize, order, store)
  with 1 and 2 worker processes;
- where the prepare time goes, step by step, on the HU path and on the lookup-table path;
- StudyCache random reads of uint8 384 x 384 slices.

Run with `make bench-prepare` or `python -m benchmarks.bench_prepare --help`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from benchmarks.common import (
    CpuMeter,
    Timing,
    build_synthetic_cache,
    format_table,
    load_average,
    machine_info,
    peak_rss_mib,
    time_repeated,
    wait_for_quiet_machine,
    write_results,
)
from csfd.allocator import keep_freed_memory

logger = logging.getLogger("benchmarks.bench_prepare")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "real-ct" / "cspine-slice" / "IM-0001-0001-0001.dcm"
# Slices in the competition's train_images (2,019 studies), most of them JPEG Lossless SV1.
COMPETITION_TRAIN_SLICES = 711_601
TARGETS = {
    "dicomsdl_vs_pydicom": 3.5,
    "prepare_vs_dicomsdl_decode": 0.8,
    "two_vs_one_process": 1.8,
    "cache_reads_per_s": 5000.0,
}


# ---------------------------------------------------------------------------------------------
# Benchmark data


def write_study_copies(dataset, study_dir: Path, study_index: int, n_slices: int) -> None:
    """Write `n_slices` copies of `dataset` as <n>.dcm, 1 mm apart along z, with fresh UIDs."""
    from pydicom.uid import generate_uid

    study_dir.mkdir(parents=True, exist_ok=True)
    x, y, z0 = (float(v) for v in dataset.ImagePositionPatient)
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    for k in range(n_slices):
        uid = generate_uid()
        dataset.SOPInstanceUID = uid
        dataset.file_meta.MediaStorageSOPInstanceUID = uid
        dataset.InstanceNumber = k + 1
        dataset.ImagePositionPatient = [x, y, z0 - 1.0 * k]
        dataset.save_as(study_dir / f"{k + 1}.dcm")


def format_label(transfer_syntax) -> str:
    """Return a short table label such as "JPEGLosslessSV1 (1.2.840.10008.1.2.4.70)"."""
    return f"{transfer_syntax.keyword} ({transfer_syntax})"


def build_benchmark_data(
    source: Path, root: Path, n_studies: int, slices_per_study: int, uncompressed_copies: int = 1
) -> dict[str, Path]:
    """Write the benchmark studies in the competition layout; return {format label: data folder}.

    The first format is the source file's own transfer syntax (pixel data copied unchanged),
    the second the same pixels decompressed to Explicit VR Little Endian. The second gets
    `uncompressed_copies` study folders per written study, the extra ones of hard links, so
    that its runs can last as long as the compressed ones without more disk.
    """
    import pydicom

    stored = pydicom.dcmread(source)
    if stored.Rows != 512 or stored.Columns != 512:
        logger.warning("%s is %d x %d, not 512 x 512 like most competition slices", source, stored.Rows, stored.Columns)
    decompressed = pydicom.dcmread(source)
    if decompressed.file_meta.TransferSyntaxUID.is_compressed:
        decompressed.decompress()
    folders = {format_label(stored.file_meta.TransferSyntaxUID): stored,
               format_label(decompressed.file_meta.TransferSyntaxUID): decompressed}
    if len(folders) == 1:
        raise ValueError(f"{source} is already uncompressed; pass a compressed slice with --source")
    data_dirs = {}
    for index, (label, dataset) in enumerate(folders.items()):
        data_dir = root / f"data{index}"
        # An empty segmentations folder keeps prepare_split from warning that it is missing.
        (data_dir / "segmentations").mkdir(parents=True, exist_ok=True)
        for study in range(n_studies):
            study_dir = data_dir / "train_images" / f"1.2.826.0.1.3680043.99.{study + 1}"
            write_study_copies(dataset, study_dir, study, slices_per_study)
        copies = uncompressed_copies if index == 1 else 1
        for study in range(n_studies, n_studies * copies):
            written = data_dir / "train_images" / f"1.2.826.0.1.3680043.99.{study % n_studies + 1}"
            linked = data_dir / "train_images" / f"1.2.826.0.1.3680043.99.{study + 1}"
            linked.mkdir()
            for path in written.iterdir():
                os.link(path, linked / path.name)
        data_dirs[label] = data_dir
    return data_dirs


def slice_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "train_images").glob("*/*.dcm"))


# ---------------------------------------------------------------------------------------------
# Decode and per-slice measurements


def decode_pydicom(path: Path) -> np.ndarray:
    import pydicom

    return pydicom.dcmread(path).pixel_array


def decode_dicomsdl(path: Path) -> np.ndarray:
    import dicomsdl

    return dicomsdl.open(str(path)).pixelData(storedvalue=True)


def decode_libjpeg_turbo(path: Path) -> np.ndarray:
    """Decode the frame's codestream, as dicomsdl reads it, with libjpeg-turbo (JPEG Lossless only)."""
    import dicomsdl

    from csfd.dicom_readers import decode_lossless_jpeg

    return decode_lossless_jpeg(dicomsdl.open(str(path)).getDataElement("PixelData"))


def pixel_decoder(path: Path) -> str:
    """Return the library that read_slice decodes this file's pixels with: "libjpeg-turbo" or "dicomsdl"."""
    from csfd.dicom_readers import read_dicomsdl

    return read_dicomsdl(path).decoder or "dicomsdl"


def read_each(read: Callable[[Path], object], files: list[Path]) -> None:
    """Call `read` on every file and drop each result before the next read, as prepare does.

    Keeping every decoded slice (a list of 3,072 arrays of 512 KiB) makes each read fault in
    fresh memory, which slowed the raw decode by about 10% and flattered the ratio against it.
    """
    for path in files:
        read(path)


def measure_per_slice(files: list[Path], repeats: int, decoder: str) -> dict[str, Timing]:
    """Time each per-slice reader over every file, in one process; `decoder` is pixel_decoder's."""
    from csfd.config import PrepareConfig
    from csfd.dicom_io import read_slice
    from csfd.volume import prepare_window, slice_transform

    prepare = PrepareConfig(image_size=384)
    transform, window = slice_transform(prepare), prepare_window(prepare)
    candidates = {
        "pydicom decode": decode_pydicom,
        "dicomsdl decode": decode_dicomsdl,
        "libjpeg-turbo decode": decode_libjpeg_turbo,
        "read_slice (pydicom)": lambda path: read_slice(path, ("pydicom",)),
        "read_slice (dicomsdl)": lambda path: read_slice(path, ("dicomsdl",)),
        "read_slice (dicomsdl) + window + resize": lambda path: transform(
            read_slice(path, ("dicomsdl",), window).pixels),
    }
    timings = {}
    for name, read in candidates.items():
        if name == "libjpeg-turbo decode" and decoder != "libjpeg-turbo":
            continue
        for path in files[:8]:  # loads the decoder plugins before timing
            read(path)
        timings[name] = time_repeated(lambda: read_each(read, files), len(files), repeats, warmup=0)
        logger.info("%s: %.0f slices/s", name, timings[name].rate)
    return timings


def pydicom_plugins(transfer_syntax: str) -> str:
    from pydicom.pixels import get_decoder

    decoder = get_decoder(transfer_syntax)
    return ", ".join(decoder.available_plugins) if decoder.is_available else "none"


# ---------------------------------------------------------------------------------------------
# Where the prepare time goes


def measure_prepare_steps(
    files: list[Path], repeats: int, store_dir: Path, decoder: str
) -> tuple[dict[str, float], dict[str, float], bool]:
    """Return (ms per slice of each step of the HU path, of the lookup-table path, outputs equal).

    Both paths call the csfd functions that read_slice calls, in the same order. read_slice
    takes the lookup-table path for 16-bit slices read with a window (the prepare stage) and
    the HU path otherwise. The HU path resizes with cv2.INTER_AREA and the lookup-table path
    with csfd's resize_keep_aspect, so "outputs equal" checks both the tables and the resize.
    """
    import dicomsdl

    from csfd.config import PrepareConfig
    from csfd.dicom_readers import RawFrame, _build_header, decode_lossless_jpeg
    from csfd.hounsfield import (
        as_16bit_words,
        check_ct_plausibility,
        check_rescale,
        check_word_plausibility,
        stored_to_hu,
        to_stored_values,
        window_tables,
        window_to_uint8,
    )
    from csfd.io_utils import atomic_save_npy
    from csfd.volume import resize_keep_aspect

    prepare = PrepareConfig(image_size=384)
    center, width = float(prepare.window_center), float(prepare.window_width)
    steps = ("open file", "parse header", "decode pixels", "mask and sign", "rescale to HU",
             "plausibility check", "window to uint8", "resize to 384 (cv2.INTER_AREA)")
    totals = dict.fromkeys(steps, 0.0)
    table_totals = {"plausibility check (word range, then table HU if needed)": 0.0, "lookup table to uint8": 0.0,
                    "resize to 384 (csfd resize_keep_aspect)": 0.0, "stack and store as .npy (per slice of one study)": 0.0}
    identical = True
    for _ in range(repeats):
        resized = []
        for path in files:
            clock = [time.perf_counter()]

            def tick(step: str, into: dict[str, float]) -> None:
                clock.append(time.perf_counter())
                into[step] += clock[-1] - clock[-2]

            dataset = dicomsdl.open(str(path))
            tick("open file", totals)
            header = _build_header(lambda keyword: dataset[keyword], str(dataset.TransferSyntaxUID or ""), path)
            tick("parse header", totals)
            if decoder == "libjpeg-turbo":
                pixels = decode_lossless_jpeg(dataset.getDataElement("PixelData"))
            else:
                pixels = dataset.pixelData(index=0, storedvalue=True)
            tick("decode pixels", totals)
            frame = RawFrame(pixels=pixels, warnings=[], **header)
            stored = to_stored_values(pixels, frame.bits_stored, frame.pixel_representation)
            tick("mask and sign", totals)
            hu = stored_to_hu(stored, frame.encoding, path)
            tick("rescale to HU", totals)
            check_ct_plausibility(hu)
            tick("plausibility check", totals)
            windowed = window_to_uint8(hu, center, width)
            tick("window to uint8", totals)
            size = (prepare.image_size, prepare.image_size)
            expected = cv2.resize(windowed, size, interpolation=cv2.INTER_AREA)
            tick("resize to 384 (cv2.INTER_AREA)", totals)

            words = as_16bit_words(pixels, frame.bits_stored)
            check_rescale(frame.encoding, path)
            tables = window_tables(frame.encoding, center, width)
            clock.append(time.perf_counter())
            check_word_plausibility(tables, words)
            tick("plausibility check (word range, then table HU if needed)", table_totals)
            looked_up = np.take(tables.uint8, words)
            tick("lookup table to uint8", table_totals)
            candidate = resize_keep_aspect(looked_up, prepare.image_size)
            tick("resize to 384 (csfd resize_keep_aspect)", table_totals)
            identical = identical and np.array_equal(candidate, expected)
            resized.append(candidate)
        # prepare writes each study once; this writes all the timed slices as one study.
        start = time.perf_counter()
        atomic_save_npy(store_dir / "study.npy", np.stack(resized))
        table_totals["stack and store as .npy (per slice of one study)"] += time.perf_counter() - start
    n = repeats * len(files)
    return ({step: 1000 * total / n for step, total in totals.items()},
            {step: 1000 * total / n for step, total in table_totals.items()}, identical)


# ---------------------------------------------------------------------------------------------
# The prepare stage end to end


def measure_prepare_split(data_dir: Path, work: Path, workers: int, repeats: int, n_slices: int) -> dict:
    """Run prepare_split into a fresh cache `repeats` times; return wall and in-worker rates."""
    from csfd.config import load_config
    from csfd.prepare import prepare_split

    config = load_config(None, [f"prepare.workers={workers}", "prepare.image_size=384", "prepare.exclude_studies=[]"])
    walls, in_worker, cores = [], [], []
    for repeat in range(repeats):
        cache_dir = work / f"cache-w{workers}-{repeat}"
        with CpuMeter() as meter:  # the pool's workers are waited for inside prepare_split
            report = prepare_split(data_dir, cache_dir, "train", config)
        walls.append(meter.wall_s)
        cores.append(meter.cores_used)
        done = report[report["status"] == "done"]
        if len(done) != len(report) or int(done["n_slices"].sum()) != n_slices:
            raise RuntimeError(f"prepare_split did not prepare every benchmark study:\n{report.to_string()}")
        in_worker.append(float(done["seconds"].sum()))
        shutil.rmtree(cache_dir)
    timing = Timing(n_slices, walls)
    # Per-study seconds summed and shared over the workers: the work itself, without pool
    # start-up and table writing, and assuming the studies spread evenly over the workers.
    worker_seconds = float(np.median(in_worker)) / min(workers, int(report.shape[0]))
    return {"timing": timing, "in_worker_rate": n_slices / worker_seconds,
            "overhead_s": timing.median_s - worker_seconds, "cores_used": float(np.median(cores))}


# ---------------------------------------------------------------------------------------------
# StudyCache random reads


def measure_cache_reads(cache_dir: Path, uids: list[str], n_slices: int, reads: int, repeats: int) -> dict[str, Timing]:
    """Time random single-slice reads and random 3-slice 2.5D stack reads through StudyCache."""
    from csfd.cache import StudyCache
    from csfd.data import stack_indices

    rng = np.random.default_rng(1)
    study_picks = rng.integers(0, len(uids), size=reads)
    position_picks = rng.integers(0, n_slices, size=reads)
    reader = StudyCache(cache_dir, "train")

    def read_slices() -> None:
        for study, position in zip(study_picks, position_picks):
            np.array(reader.volume(uids[study])[position])

    def read_stacks() -> None:
        for study, position in zip(study_picks, position_picks):
            volume = reader.volume(uids[study])
            np.asarray(volume[stack_indices(int(position), volume.shape[0], 1)])

    return {
        "single slice": time_repeated(read_slices, reads, repeats),
        "3-slice stack (2.5D, context 1)": time_repeated(read_stacks, reads, repeats),
    }


# ---------------------------------------------------------------------------------------------
# Report


def hours(slices: int, rate: float) -> float:
    return slices / rate / 3600


def measure_format(data_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """Measure one format's folder: per-slice rates, the step breakdown, and prepare_split per worker count."""
    # Per-slice rates do not depend on the study layout, so a spread-out subset of files is enough.
    files = slice_files(data_dir)
    n_slices = len(files)
    files = files[:: max(1, len(files) // args.decode_files)][: args.decode_files]
    decoder = pixel_decoder(files[0])
    entry = {"slices": n_slices, "decoder": decoder, "per_slice": measure_per_slice(files, args.repeats, decoder)}
    entry["steps_ms"], entry["table_ms"], entry["table_identical"] = measure_prepare_steps(
        files, args.repeats, work, decoder
    )
    entry["prepare"] = {w: measure_prepare_split(data_dir, work, w, args.repeats, n_slices) for w in args.workers}
    entry["load_average_after"] = load_average()
    return entry


def run(args: argparse.Namespace) -> dict:
    from pydicom.uid import UID

    load_before = wait_for_quiet_machine(args.max_load, args.max_wait_min * 60)
    info = machine_info()
    info["load_average_before"] = load_average()
    work = Path(tempfile.mkdtemp(prefix="csfd-bench-prepare-"))
    started = time.perf_counter()
    try:
        logger.info("writing %d studies x %d slices per format under %s", args.studies, args.slices_per_study, work)
        data_dirs = build_benchmark_data(
            args.source, work, args.studies, args.slices_per_study, args.uncompressed_copies
        )
        formats = []
        for label, data_dir in data_dirs.items():
            syntax = label.rsplit("(", 1)[1].rstrip(")")
            entry = measure_format(data_dir, work, args)
            formats.append({"format": label, "compressed": UID(syntax).is_compressed,
                            "pydicom_plugins": pydicom_plugins(syntax), **entry})

        cache_dir = work / "synthetic-cache"
        uids = build_synthetic_cache(cache_dir, args.cache_studies, args.cache_slices, 384)
        cache_reads = measure_cache_reads(cache_dir, uids, args.cache_slices, args.reads, args.repeats)
    finally:
        if args.keep:
            logger.info("kept the benchmark files in %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    info["load_average_after"] = load_average()
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["peak_rss_mib"] = peak_rss_mib()
    return summarise(args, info, load_before, formats, cache_reads)


def step_breakdown_rows(entry: dict) -> list[dict]:
    label, rows = entry["format"], []
    shared = ("open file", "parse header", "decode pixels")
    path = "HU path (read_slice without a window) + window + resize"
    for step, ms in entry["steps_ms"].items():
        note = entry["decoder"] if step == "decode pixels" else None
        rows.append({"format": label, "path": path, "step": step, "ms/slice": ms, "note": note})
    path = "lookup-table path (prepare: read_slice with a window) + resize"
    for step in shared:
        note = entry["decoder"] if step == "decode pixels" else None
        rows.append({"format": label, "path": path, "step": step, "ms/slice": entry["steps_ms"][step], "note": note})
    for step, ms in entry["table_ms"].items():
        rows.append({"format": label, "path": path, "step": step, "ms/slice": ms})
    if 1 in entry["prepare"]:
        prepare_ms = 1000 / entry["prepare"][1]["timing"].rate
        per_slice = sum(entry["steps_ms"][step] for step in shared) + sum(entry["table_ms"].values())
        rows.append({"format": label, "path": path,
                     "step": "rest of prepare_split (ordering, header checks, .json/.csv writes)",
                     "ms/slice": prepare_ms - per_slice})
    rows.append({"format": label, "path": path, "step": "output equal to the HU path's", "ms/slice": None,
                 "note": "yes" if entry["table_identical"] else "NO"})
    return rows


def prepare_target_rows(label: str, entry: dict) -> list[dict]:
    rows, compressed = [], entry["compressed"]
    prepare, decode = entry["prepare"], entry["per_slice"]["dicomsdl decode"]
    if 1 in prepare:
        ratio = prepare[1]["timing"].rate / decode.rate
        # Decoding uncompressed data is a copy, about 0.08 ms per slice, and no prepare path
        # comes near it. So the ratio is shown for reference and the target is for compressed data.
        wanted = f">= {TARGETS['prepare_vs_dicomsdl_decode']}" if compressed else "reference only"
        met = ratio >= TARGETS["prepare_vs_dicomsdl_decode"] if compressed else None
        rows.append({"format": label, "target": "prepare_split (1 process, wall) / dicomsdl decode",
                     "wanted": wanted, "measured": ratio, "met": met})
        if "libjpeg-turbo decode" in entry["per_slice"]:
            # Against the decoder that prepare itself uses, this shows the share of time spent decoding.
            ratio = prepare[1]["timing"].rate / entry["per_slice"]["libjpeg-turbo decode"].rate
            rows.append({"format": label, "target": "prepare_split (1 process, wall) / libjpeg-turbo decode",
                         "wanted": "reference only", "measured": ratio, "met": None})
    if 1 in prepare and 2 in prepare:
        for kind, key in (("wall", None), ("in-worker", "in_worker_rate")):
            two = prepare[2]["timing"].rate if key is None else prepare[2][key]
            one = prepare[1]["timing"].rate if key is None else prepare[1][key]
            rows.append({"format": label, "target": f"prepare_split 2 processes / 1 process ({kind})",
                         "wanted": f">= {TARGETS['two_vs_one_process']}", "measured": two / one,
                         "met": two / one >= TARGETS["two_vs_one_process"]})
    return rows


def summarise(args, info: dict, load_before: float, formats: list[dict], cache_reads: dict[str, Timing]) -> dict:
    rate_rows, step_rows, target_rows = [], [], []
    for entry in formats:
        label = entry["format"]
        for name, timing in entry["per_slice"].items():
            rate_rows.append({"format": label, "measurement": name, "processes": 1, "slices/s": timing.rate,
                              "spread": timing.spread, "runs": len(timing.seconds)})
        for workers, result in entry["prepare"].items():
            timing = result["timing"]
            rate_rows.append({"format": label, "measurement": "prepare_split (wall, incl. pool start-up and tables)",
                              "processes": workers, "slices/s": timing.rate, "spread": timing.spread,
                              "runs": len(timing.seconds), "fixed overhead s": result["overhead_s"],
                              "cores used": result["cores_used"]})
            rate_rows.append({"format": label, "measurement": "prepare_split (in-worker study time)",
                              "processes": workers, "slices/s": result["in_worker_rate"], "spread": None,
                              "runs": len(timing.seconds)})
        if "steps_ms" in entry:
            step_rows += step_breakdown_rows(entry)
        per_slice = entry["per_slice"]
        if "pydicom decode" in per_slice:
            ratio = per_slice["dicomsdl decode"].rate / per_slice["pydicom decode"].rate
            target_rows.append({"format": label, "target": "dicomsdl decode / pydicom decode",
                                "wanted": f">= {TARGETS['dicomsdl_vs_pydicom']}", "measured": ratio,
                                "met": ratio >= TARGETS["dicomsdl_vs_pydicom"]})
        target_rows += prepare_target_rows(label, entry)

    cache_rows = [{"read": name, "items/s": timing.rate, "slices/s": timing.rate * (3 if "3-slice" in name else 1),
                   "spread": timing.spread, "runs": len(timing.seconds)} for name, timing in cache_reads.items()]
    single = cache_reads["single slice"].rate
    target_rows.append({"format": "uint8 384 x 384 cache", "target": "StudyCache random single-slice reads per s",
                        "wanted": f">= {TARGETS['cache_reads_per_s']:.0f}", "measured": single,
                        "met": single >= TARGETS["cache_reads_per_s"]})

    projection_rows = []
    for entry in formats:
        if entry is not formats[0]:
            continue
        for workers, result in entry["prepare"].items():
            # The fixed overhead (pool start-up, tables) comes once per run, so the in-worker
            # rate is the one that scales to 2,019 studies.
            rate = result["in_worker_rate"]
            projection_rows.append({"basis": f"{entry['format']}: prepare_split in-worker rate, {workers} process(es)",
                                    "slices/s": rate, "hours for 711,601 slices": hours(COMPETITION_TRAIN_SLICES, rate)})
    for name in ("dicomsdl decode", "libjpeg-turbo decode"):
        if name in formats[0]["per_slice"]:
            rate = formats[0]["per_slice"][name].rate
            projection_rows.append({"basis": f"{formats[0]['format']}: {name} alone, 1 process", "slices/s": rate,
                                    "hours for 711,601 slices": hours(COMPETITION_TRAIN_SLICES, rate)})

    return {
        "machine": info,
        "command": " ".join(sys.argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_at_start": load_before,
        "rates": rate_rows,
        "steps": step_rows,
        "cache_reads": cache_rows,
        "targets": target_rows,
        "projection": projection_rows,
        "per_format_load_after": {entry["format"]: entry["load_average_after"] for entry in formats},
    }


def print_report(result: dict) -> None:
    machine = result["machine"]
    print(f"\nMachine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
          f"{machine['date']}; load average before {tuple(round(v, 2) for v in machine['load_average_before'])}, "
          f"after {tuple(round(v, 2) for v in machine['load_average_after'])}")
    print("\nThroughput (median of the timed runs; spread = (slowest - fastest) / median):\n")
    print(format_table(result["rates"], ["format", "measurement", "processes", "slices/s", "spread", "runs",
                                         "fixed overhead s", "cores used"]))
    print("\nWhere one slice's time goes (1 process, dicomsdl reader):\n")
    print(format_table(result["steps"], ["format", "path", "step", "ms/slice", "note"]))
    print("\nStudyCache random reads (page cache warm):\n")
    print(format_table(result["cache_reads"], ["read", "items/s", "slices/s", "spread", "runs"]))
    print("\nTargets:\n")
    print(format_table(result["targets"], ["format", "target", "wanted", "measured", "met"]))
    print(f"\nProjection for the competition's train_images (711,601 slices, all decoding like "
          f"{result['rates'][0]['format']}), at the measured rates:\n")
    print(format_table(result["projection"], ["basis", "slices/s", "hours for 711,601 slices"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help="a compressed single-frame CT slice to copy (default: the real C-spine JPEG Lossless slice)")
    # A 2-process run has a fixed cost (0.45 to 0.49 s on .70 in BENCHMARKS.md, most of it the
    # start-up of the spawned workers) that a real prepare run of 711,601 slices spreads thin.
    # On .70, 64 studies (8,192 slices, 14 to 16 s with 2 processes) keep it near 3% of the
    # wall time.
    parser.add_argument("--studies", type=int, default=64, help="benchmark studies per format (default 64)")
    parser.add_argument("--slices-per-study", type=int, default=128, help="slices per benchmark study (default 128)")
    # Uncompressed slices prepare about 3 times as fast as .70 ones. With as many studies, a
    # 2-process run lasts 5 s, and the 0.3 s start-up of the spawned workers moves its ratio
    # more than the work does.
    parser.add_argument("--uncompressed-copies", type=int, default=3,
                        help="uncompressed study folders per written study, the extra ones hard links (default 3)")
    parser.add_argument("--decode-files", type=int, default=128,
                        help="files per format for the per-slice measurements (default 128)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prepare.workers values to run (default 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    parser.add_argument("--cache-studies", type=int, default=4, help="studies in the synthetic cache (default 4)")
    parser.add_argument("--cache-slices", type=int, default=350, help="slices per synthetic cache study (default 350)")
    parser.add_argument("--reads", type=int, default=5000, help="random cache reads per timed run (default 5000)")
    parser.add_argument("--max-load", type=float, default=0.7,
                        help="wait for a 1-minute load average below this before measuring (default 0.7)")
    parser.add_argument("--max-wait-min", type=float, default=0.0,
                        help="minutes to wait for that load at most; 0 measures at once (default 0)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary benchmark files")
    parser.add_argument("--output", type=Path, default=Path("output/bench"), help="folder for prepare.json and prepare.csv")
    args = parser.parse_args(argv)
    if args.uncompressed_copies < 1:
        parser.error(f"--uncompressed-copies must be at least 1, got {args.uncompressed_copies}")
    if not args.source.is_file():
        parser.error(f"source slice not found: {args.source}; pass a real compressed CT slice with --source")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # prepare_split logs a summary line and draws a progress bar per run, and the benchmark
    # prints its own tables. tqdm 4.67 reads TQDM_DISABLE as the default of its `disable` argument.
    logging.getLogger("csfd").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = parse_args(argv)
    # Per-core rates: the decode and step timings run on one core, as one prepare worker does,
    # and with the allocator settings that prepare gives its processes (csfd.allocator), so that
    # the decode-only rates and prepare are measured alike.
    cv2.setNumThreads(1)
    if not keep_freed_memory():
        logger.warning("mallopt did not apply csfd.allocator's settings: rates are measured with the default allocator settings")
    result = run(args)
    print_report(result)
    rows = [{"table": name, **row} for name in ("rates", "steps", "cache_reads", "targets", "projection") for row in result[name]]
    json_path, csv_path = write_results("prepare", result, rows, args.output)
    print(f"\nWrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
