"""The data path of one sample, run one way, each step a module that imports only the steps before it:

    records  read the dataset file, validate every record, all problems at once   (records.py)
       ↓
    chat     a record -> chat-template messages; what the GRPO rewards read        (chat.py)
       ↓
    budget   `Sampling`; frames, positions and sizes planned from the headers and
             the text, shrunk to fit the token budget before anything is decoded    (budget.py)
       ↓
    video    decode only the planned frames, draw the time and subtitle on them at
             their native size, resize                                           (video_r2.video)
       ↓
    dataset  processor -> input ids, labels, vision tensors; collate             (dataset.py)

`VideoDataModule` (module.py) is the `data:` section of a LightningCLI config; `check_data` (check.py) is
`video-r2 check-data`, which runs the first three steps (and one decoded frame per video) without a model.

Names are imported on first use, so `video_r2.video` can use `budget` without pulling in Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Problem": "records", "DataValidationError": "records", "read_records": "records",
    "validate_record": "records", "load_dataset": "records", "media_paths": "records",
    "DEFAULT_SYSTEM_PROMPT": "chat", "to_messages": "chat", "strip_tags": "chat",
    "reference_answer": "chat", "reward_sample": "chat",
    "Sampling": "budget", "Grid": "budget", "Media": "budget", "TooLong": "budget", "VideoInfo": "budget",
    "plan_frames": "budget", "frame_indices": "budget", "fit_size": "budget", "plan_media": "budget",
    "fit_budget": "budget", "seconds_per_grid": "budget",
    "VideoR2Dataset": "dataset", "Collator": "dataset", "BadSample": "dataset", "IGNORE_INDEX": "dataset",
    "VideoDataModule": "module",
    "check_data": "check",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return __all__
