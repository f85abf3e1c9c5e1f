"""Reading and validating dataset records: the first step of the data path, before any model or video.

A record, as in the original Video-R2 files (extra keys are allowed and ignored):

    {
      "id": "sft_0000",                                   # optional; the record index stands in
      "video": "clip.mp4",                                # or a list; relative to `video_folder`
      "conversations": [                                  # optional leading {"from": "system", ...}
        {"from": "human", "value": "<video>\\nWhat happens at 00:02?"},
        {"from": "gpt", "value": "<think>At 00:02 ...</think><answer>B</answer>"}
      ],                                                  # more human/gpt pairs: multi-turn
      "temporal_grounding": {"00:00-00:02": "A star fills the screen."},   # required for GRPO (TAR)
      "question_type": "multiple choice"                  # optional; read by the accuracy reward
    }

`image` (a path or a list) may stand where `video` stands; each `<video>` / `<image>` tag in the human
turns marks where one of them goes, so the tag count must equal the number of paths.

Every problem is collected, with its file, record index and field, so that one run of validation lists
them all (`DataValidationError`) instead of failing on the first. Timestamp keys are read by
`video_r2.formats.parse_timestamp_key`, the same reading the TAR reward uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_r2.formats import parse_timestamp_key

VIDEO_TAG = "<video>"
IMAGE_TAG = "<image>"
# LLaVA-style speaker names (and the chat names) -> chat template roles
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
STAGES = ("sft", "grpo")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (file, record index, field) and what."""

    file: str
    index: int | None  # None: the file itself
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.index is None else f"{self.file} record {self.index}"
        return f"{where} [{self.field}]: {self.message}"


class DataValidationError(ValueError):
    """Raised at setup, before any training, with every problem found in the dataset."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:200])
        more = f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else ""
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n{shown}{more}")


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> tuple[list[Any], list[Problem]]:
    """Records of a JSON file (a list of records) or a JSON Lines file (one record per line).

    The format is told by the content, not the suffix. An unreadable JSON Lines line becomes a problem and
    a `None` record at its place, so record indices stay the line's record number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM
    except FileNotFoundError:
        return [], [Problem(str(path), None, "<file>", "no such file: check data_path (or val_data_path)")]
    except UnicodeDecodeError as e:
        return [], [Problem(str(path), None, "<file>", f"not UTF-8 text (byte {e.start}): save the dataset as "
                                                        "UTF-8 JSON or JSON Lines")]
    except OSError as e:
        return [], [Problem(str(path), None, "<file>", f"cannot be read ({e.strerror})")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    else:
        if isinstance(data, list):
            return data, []
        if isinstance(data, dict):  # a single record (or a one-line JSON Lines file)
            return [data], []
        return [], [Problem(str(path), None, "<file>", "expected a list of records or JSON Lines")]
    records: list[Any] = []
    problems: list[Problem] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), len(records), "<json>", f"line {line_no}: invalid JSON ({e.msg})"))
            records.append(None)
    if not records:
        problems.append(Problem(str(path), None, "<file>", "no records"))
    return records, problems


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def media_file(folder: Path, path: str) -> Path | None:
    """The file a record's media `path` names under `folder`, or None when it leaves the folder.

    Relative paths are checked for `..` when the records are validated; an absolute path is accepted only
    inside `folder` (compared as written: a symlink in the folder may point anywhere, as the user chose)."""
    if not Path(path).is_absolute():
        return folder / path
    inside = Path(path).absolute().is_relative_to(folder.absolute())
    return Path(path) if inside else None


def media_paths(record: dict, key: str) -> list[str]:
    """The record's `video` or `image` paths as a list (a single path is allowed)."""
    value = record.get(key)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def validate_record(record: Any, stage: str = "sft") -> list[tuple[str, str]]:
    """`(field, message)` for everything wrong with one record (empty when it is usable)."""
    if not isinstance(record, dict):
        return [("<record>", f"expected a JSON object, got {type(record).__name__}")]
    problems: list[tuple[str, str]] = []
    if "id" in record and not isinstance(record["id"], (str, int)):
        problems.append(("id", "must be a string or an integer"))

    # media
    if "video" in record and "image" in record:
        problems.append(("video", "a record has either `video` or `image`, not both"))
    for key in ("video", "image"):
        if key not in record:
            continue
        value = record[key]
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            problems.append((key, "must be a non-empty path or a non-empty list of paths"))
            continue
        for escaping in [p for p in paths if ".." in Path(p).parts]:
            # The folder flag says where the media are; a path out of it would open any file on the machine.
            problems.append((key, f"{escaping!r} leaves video_folder: give paths relative to it, without '..'"))

    # conversations
    turns = record.get("conversations")
    if turns is None:
        problems.append(("conversations", "missing"))
        return problems
    if not isinstance(turns, list) or not turns:
        problems.append(("conversations", "must be a non-empty list of turns"))
        return problems
    roles = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append((f"conversations[{i}]", "must be an object with `from` and `value`"))
            continue
        if turn.get("from") not in ROLES:
            problems.append((f"conversations[{i}].from", f"must be one of {sorted(ROLES)}, got {turn.get('from')!r}"))
            continue
        if not isinstance(turn.get("value"), str):
            problems.append((f"conversations[{i}].value", "missing or not a string"))
            continue
        roles.append(ROLES[turn["from"]])
    if len(roles) == len(turns):
        body = roles[1:] if roles[0] == "system" else roles
        expected = ["user", "assistant"] * (len(body) // 2 + 1)
        if not body or body != expected[: len(body)] or body[-1] != "assistant":
            problems.append(("conversations", "turns must alternate human, gpt, ... and end with gpt "
                                              f"(after an optional system turn); got {roles}"))
        for key, tag in (("video", VIDEO_TAG), ("image", IMAGE_TAG)):
            in_user = sum(t["value"].count(tag) for t, r in zip(turns, roles) if r == "user")
            elsewhere = sum(t["value"].count(tag) for t, r in zip(turns, roles) if r != "user")
            n_paths = len(media_paths(record, key)) if isinstance(record.get(key), (str, list)) else 0
            if elsewhere:
                problems.append(("conversations", f"{tag} tag outside a human turn"))
            if in_user != n_paths:
                problems.append(("conversations", f"{in_user} {tag} tag(s) but {n_paths} {key}(s)"))

    # temporal grounding: the reference events of TAR
    grounding = record.get("temporal_grounding")
    if grounding is None:
        if stage == "grpo":
            problems.append(("temporal_grounding", "missing (GRPO's temporal alignment reward needs it)"))
    elif not isinstance(grounding, dict):
        problems.append(("temporal_grounding", "must be an object {\"MM:SS-MM:SS\": sentence}"))
    else:
        for key, sentence in grounding.items():
            if parse_timestamp_key(key) is None:
                problems.append(("temporal_grounding", f"unparseable timestamp key {key!r}"))
            if not isinstance(sentence, str):
                problems.append(("temporal_grounding", f"value of {key!r} must be a string"))
    if "question_type" in record and not isinstance(record["question_type"], (str, type(None))):
        problems.append(("question_type", "must be a string"))
    return problems


def load_dataset(path: str | Path, stage: str = "sft") -> tuple[list[Any], list[Problem]]:
    """Read a dataset file and validate every record; returns the records and all problems found."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    records, problems = read_records(path)
    for index, record in enumerate(records):
        if record is None:  # unreadable line, already reported
            continue
        problems += [Problem(str(path), index, f, m) for f, m in validate_record(record, stage)]
    return records, problems
