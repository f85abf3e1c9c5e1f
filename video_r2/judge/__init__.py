"""TAR's judge: the client training uses, the two prompts it sends, and the server that can answer them.

- `client`: `JudgeClient` (concurrent, retried, cached requests to any OpenAI-compatible judge) and the
  tolerant readers of its replies, `parse_claims` and `parse_verdict`;
- `prompts`: the extraction and consistency prompts, and how to read their fields back;
- `rules`: the rules judge, pure functions that answer both prompts without a model;
- `backends`, `server`, `watchdog`: the judge server that `serve/judge_app.py` runs (LitServe). They are
  imported only by the server, so that importing this package stays light (no litserve or fastapi).

`video_r2.judge.JudgeClient` is the class path the GRPO configs name for `model.init_args.judge`.
"""

from video_r2.judge.client import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    JudgeClient,
    JudgeUnavailableError,
    parse_claims,
    parse_verdict,
)

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_MODEL", "JudgeClient", "JudgeUnavailableError", "parse_claims", "parse_verdict"]
