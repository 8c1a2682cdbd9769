"""LightGBM parameters and sample weights for the stage-2 stacker.

LightGBM only warns about a parameter it does not know, so a typo in stack.params would
silently do nothing. validate_lightgbm_params rejects it instead, checking every key against
the parameter names and aliases that the installed LightGBM library itself reports.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from csfd.config import ConfigError
from csfd.constants import TARGET_WEIGHTS, TARGETS

logger = logging.getLogger(__name__)

# Objectives whose output is a probability; the metric is a log loss over probabilities.
PROBABILITY_OBJECTIVES = ("binary", "cross_entropy", "xentropy")
# Parameters that train_stacker sets from StackConfig fields; setting them in params too would
# leave two values for one setting.
CONTROLLED_PARAMETERS = {
    "num_iterations": "stack.num_boost_round",
    "early_stopping_round": "stack.early_stopping_rounds",
}
SAMPLE_WEIGHTINGS = ("per_study", "flat", "none")


@functools.cache
def lightgbm_parameter_aliases() -> dict[str, tuple[str, ...]]:
    """Return {main name: (main name, *aliases)} for every parameter of the installed LightGBM.

    The table comes from the C library's LGBM_DumpParamAliases, which lists every field of
    LightGBM's Config, read through lightgbm.basic._ConfigAliases (present in lightgbm 4.x,
    verified with 4.7.0). It is a private helper, so its absence is reported, not guessed around.
    """
    import lightgbm
    from lightgbm import basic

    reader = getattr(getattr(basic, "_ConfigAliases", None), "_get_all_param_aliases", None)
    if reader is None:
        raise RuntimeError(
            f"lightgbm {lightgbm.__version__} has no lightgbm.basic._ConfigAliases._get_all_param_aliases; "
            f"install the pinned lightgbm version from requirements.txt or update lightgbm_parameter_aliases"
        )
    return {main: tuple(names) for main, names in reader().items()}


def _main_name_of() -> dict[str, str]:
    return {alias: main for main, names in lightgbm_parameter_aliases().items() for alias in names}


def validate_lightgbm_params(params: Mapping) -> dict:
    """Check stacker parameters and return them as a plain dict.

    Raises ConfigError when a key is not a LightGBM parameter or alias, listing close matches.
    Also raises when two keys are aliases of one parameter, when a key sets a value that
    StackConfig controls (num_iterations, early_stopping_round and their aliases), or when the
    objective does not predict probabilities.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(f"stack.params: expected a mapping of LightGBM parameters, got {params!r}")
    main_of = _main_name_of()
    all_names = sorted(main_of)
    unknown = [key for key in params if not isinstance(key, str) or key not in main_of]
    if unknown:
        details = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), all_names, n=3, cutoff=0.6)
            hint = f" (close matches: {', '.join(close)})" if close else ""
            details.append(f"{key!r}{hint}")
        raise ConfigError(
            f"stack.params: unknown LightGBM parameter(s) {'; '.join(details)}; see the parameter "
            f"list of LightGBM {_lightgbm_version()} (docs: Parameters)"
        )

    by_main: dict[str, list[str]] = {}
    for key in params:
        by_main.setdefault(main_of[key], []).append(key)
    repeated = {main: keys for main, keys in by_main.items() if len(keys) > 1}
    if repeated:
        main, keys = next(iter(repeated.items()))
        raise ConfigError(
            f"stack.params: {', '.join(keys)} are aliases of the same LightGBM parameter {main}; keep one"
        )
    for main, field in CONTROLLED_PARAMETERS.items():
        if main in by_main:
            raise ConfigError(f"stack.params: remove {by_main[main][0]!r}; set {field} instead")

    if "objective" in by_main:
        key = by_main["objective"][0]
        if params[key] not in PROBABILITY_OBJECTIVES:
            raise ConfigError(
                f"stack.params: {key} {params[key]!r} does not predict probabilities; "
                f"use one of {', '.join(PROBABILITY_OBJECTIVES)}"
            )
    return dict(params)


def _lightgbm_version() -> str:
    import lightgbm

    return lightgbm.__version__


def resolve_training_params(params: Mapping, seed: int) -> dict:
    """Validate `params` and fill the defaults the stacker relies on.

    Adds objective "binary", metric "binary_logloss" (the metric early stopping watches),
    verbosity -1 and seed `seed` where params do not set them. A seed in params wins over
    `seed`, with a warning.
    """
    resolved = validate_lightgbm_params(params)
    present = {_main_name_of()[key] for key in resolved}
    defaults = {"objective": "binary", "metric": "binary_logloss", "verbosity": -1, "seed": int(seed)}
    if "seed" in present:
        logger.warning("stack.params sets a seed, so the experiment seed %d is not used by LightGBM", seed)
    for main, value in defaults.items():
        if main not in present:
            resolved[main] = value
    return resolved


def target_weight_table(labels: pd.DataFrame, mode: str = "per_study") -> pd.DataFrame:
    """Return one weight per study and target that follows the competition metric.

    labels: indexed by StudyInstanceUID with the eight target columns (0/1).
    mode "per_study": w / W. Here w is the row weight of the metric (vertebra 1 negative and
    2 positive, patient_overall 7 and 14) and W the sum of the study's eight w. With these
    weights a weighted log loss over all rows equals the competition's per-study form. "flat": w alone (the form
    that normalises once over all rows). "none": 1 everywhere.
    """
    if mode not in SAMPLE_WEIGHTINGS:
        raise ValueError(f"invalid sample weighting {mode!r}; expected one of {', '.join(SAMPLE_WEIGHTINGS)}")
    if mode == "none":
        return pd.DataFrame(1.0, index=labels.index, columns=list(TARGETS))
    positive = labels[list(TARGETS)].to_numpy(dtype=float) > 0.5
    negative_weight = np.array([TARGET_WEIGHTS[t][0] for t in TARGETS])
    positive_weight = np.array([TARGET_WEIGHTS[t][1] for t in TARGETS])
    weights = np.where(positive, positive_weight, negative_weight)
    if mode == "per_study":
        weights = weights / weights.sum(axis=1, keepdims=True)
    return pd.DataFrame(weights, index=labels.index, columns=list(TARGETS))
