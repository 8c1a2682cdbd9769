"""Run prepare tasks in this process or in worker processes, and survive a decoder that crashes.

dicomsdl 0.109 crashes the process (a segmentation fault, not an exception) on some damaged
files, for example an uncompressed slice cut short inside its pixel data. A crash in a worker
breaks the whole pool. Each worker keeps a marker file while it decodes a study
(csfd.prepare_worker.working_marker), so after a crash the studies with a marker left behind
are the suspects. Each suspect is retried alone in a fresh process and, if that crashes too,
with pydicom as its only reader, whose errors are exceptions that name the file. The other
studies continue in a new pool. A marker left by an earlier run that crashed (a 1-worker run decodes in this process, so
the crash ends the run) sends that study to the same retry on the next run.

NOTE: a study retried with pydicom alone cannot use dicomsdl for the files pydicom rejects
(dicomsdl alone reads files with VR UN tags, for example), so it may fail where its files
would otherwise pass.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Iterator, Sequence

import cv2

from csfd.allocator import keep_freed_memory
from csfd.prepare_worker import StudyTask, init_worker, prepare_study, report_row, working_marker

logger = logging.getLogger(__name__)

# pydicom raised an exception, not a crash, on every damaged file that crashed dicomsdl 0.109 in the tests.
ISOLATED_READERS = ("pydicom",)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    # spawn: the parent has threads (tqdm, decoders) that fork would copy in an unknown state.
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(logging.getLogger().getEffectiveLevel(),),
    )


def _run_in_process(tasks: Sequence[StudyTask], workers: int) -> Iterator[dict]:
    # prepare.workers bounds the cores, here too: OpenCV would otherwise resize on every core.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(workers)
    # This lasts for the rest of the process, because mallopt settings cannot be read back.
    keep_freed_memory()
    try:
        for task in tasks:
            yield prepare_study(task)
    finally:
        cv2.setNumThreads(threads)


def _run_pool(tasks: Sequence[StudyTask], workers: int) -> Iterator[dict]:
    pool = _new_pool(min(workers, len(tasks)))
    try:
        futures = [pool.submit(prepare_study, task) for task in tasks]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # On an error or Ctrl-C, studies not yet started are cancelled instead of awaited.
        pool.shutdown(wait=True, cancel_futures=True)


def _run_alone(task: StudyTask) -> dict | None:
    """Return the row of `task` run in a fresh process of its own, or None when that process dies."""
    pool = _new_pool(1)
    try:
        return pool.submit(prepare_study, task).result()
    except BrokenProcessPool:
        return None
    finally:
        pool.shutdown(wait=True)
        working_marker(task).unlink(missing_ok=True)


def run_isolated(task: StudyTask) -> dict:
    """Prepare a suspect study alone, then with pydicom only if it crashes again. A third crash fails it.

    A study decoded next to the crashing one loses its worker too, so it gets its first retry
    with the usual readers.
    """
    row = _run_alone(task)
    if row is not None:
        return row
    logger.warning("study %s crashed a decoder again; retrying it with pydicom as its only reader", task.study_uid)
    row = _run_alone(replace(task, readers=ISOLATED_READERS))
    if row is not None:
        return row
    return report_row(
        task.study_uid, task.split, "failed",
        error="the decoder crashed the worker process on this study, with dicomsdl and again with pydicom "
        "alone; one of its files is likely damaged (truncated, or a header that does not match its pixel data)",
    )


def run_tasks(tasks: Sequence[StudyTask], workers: int) -> Iterator[dict]:
    """Yield the report row of every task as it finishes, with crashed studies as failed rows."""
    crashed_before = [task for task in tasks if working_marker(task).exists()]
    # NOTE: one at a time, each in a new process (about 0.4 s to start), so after a killed run
    # this adds up to prepare.workers such starts before the pool begins.
    for task in crashed_before:
        logger.warning("study %s was being decoded when an earlier run stopped (a crash or a kill); retrying it alone",
                       task.study_uid)
        yield run_isolated(task)
    remaining = {task.study_uid: task for task in tasks if task not in crashed_before}

    if workers == 1:
        yield from _run_in_process(list(remaining.values()), workers)
        return
    # Even a single study goes to a worker process, where a decoder crash cannot end the run.
    while remaining:
        try:
            for row in _run_pool(list(remaining.values()), workers):
                remaining.pop(row["StudyInstanceUID"], None)
                yield row
        except BrokenProcessPool as error:
            suspects = [task for task in remaining.values() if working_marker(task).exists()]
            if not suspects:
                raise RuntimeError(
                    f"a prepare worker died ({error}) between studies; lower prepare.workers if memory is short "
                    "and run again (finished studies are kept)"
                ) from error
            for task in suspects:
                logger.warning("study %s: a worker process died while decoding it; retrying it alone", task.study_uid)
                del remaining[task.study_uid]
                yield run_isolated(task)
