"""`video-r2 inspect EVALUATION`: why TAR gave each sample its score, as one self-contained HTML page.

A TAR value alone does not tell a user what went wrong: no claim, a claim at the wrong second, a claim about
the wrong thing, or an answer the reasoning does not support. For N samples of a `video-r2 evaluate` JSON, or
of a GRPO step's completion log (`<log_dir>/completions/step-N.json`, written every `log_completions_every`
steps in the same layout), this page shows the frames the model saw (with their drawn times), the question,
the completion, the claims the judge extracted, each claim's comparison with every reference event (time
overlap once both spans are widened by the buffer, similarity against the threshold, and the event it
matched), the consistency verdict and each reward. Images are inlined as data URIs, so the file opens anywhere without a server.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from video_r2.formats import format_mmss

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; max-width: 1100px; }
section.sample { border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin: 1.5em 0; }
pre { background: #f6f6f6; padding: .6em; white-space: pre-wrap; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
.yes { color: #17702a; font-weight: 600; } .no { color: #b3261e; font-weight: 600; }
img.strip { image-rendering: pixelated; max-width: 100%; }
"""


def inspect(
    evaluation: Path,
    out: Path | None = None,
    num_samples: int = 8,
    ids: list[str] | None = None,
    frames: bool = True,
) -> Path:
    """Write an HTML report of how TAR scored N samples of an evaluation.

    Args:
        evaluation: the JSON `video-r2 evaluate --out` wrote (with a judge, so that it holds TAR's details), or a
            GRPO run's `<log_dir>/completions/step-N.json`.
        out: the HTML file to write; defaults to the evaluation's path with `.html`.
        num_samples: how many samples to show (the first N, or of `ids`).
        ids: show these sample ids only.
        frames: draw each sample's frame strip (needs the videos where the evaluation found them).
    """
    evaluation = Path(evaluation)
    if not evaluation.is_file():
        raise SystemExit(f"video-r2 inspect: no evaluation file at {evaluation}; write one with "
                         f"`video-r2 evaluate ... --judge_base_url URL --out {evaluation}`, or pass a GRPO run's "
                         "<log_dir>/completions/step-N.json")
    try:
        results = json.loads(evaluation.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"video-r2 inspect: {evaluation} is not JSON ({error})") from None
    rows = results.get("samples") if isinstance(results, dict) else None
    if not rows:
        raise SystemExit(f"video-r2 inspect: {evaluation} holds no samples; is it a `video-r2 evaluate` output?")
    if not any("tar_details" in r for r in rows):
        raise SystemExit(f"video-r2 inspect: {evaluation} has no TAR details; evaluate with --judge_base_url "
                         "(and the tar reward) to record them")
    if ids:
        wanted = {str(i) for i in ids}
        rows = [r for r in rows if str(r.get("id")) in wanted]
    rows = rows[:num_samples]

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>TAR inspection: {_e(evaluation.name)}"
             f"</title><style>{_STYLE}</style></head><body>",
             f"<h1>How TAR scored {len(rows)} samples</h1>", _header(results, evaluation)]
    parts += [_sample(row, results, frames) for row in rows]
    parts.append("</body></html>")
    out = Path(out) if out is not None else evaluation.with_suffix(".html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {out} ({len(rows)} samples)")
    return out


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _header(results: dict, evaluation: Path) -> str:
    keys = ("accuracy", "format", "tar", "grounded_share", "consistency")
    cells = "".join(f"<tr><th>{k}</th><td class='summary' data-name='{k}'>{_number(results.get(k))}</td></tr>"
                    for k in keys if k in results)
    return (f"<p>model <code>{_e(results.get('model'))}</code> on <code>{_e(results.get('data_path'))}</code> "
            f"({_e(results.get('num_samples'))} samples; file <code>{_e(evaluation)}</code>)</p>"
            f"<table>{cells}</table>")


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else _e(value)


def _span(start: int, end: int) -> str:
    return format_mmss(start) if start == end else f"{format_mmss(start)}-{format_mmss(end)}"


def _sample(row: dict, results: dict, frames: bool) -> str:
    details = row.get("tar_details") or {}
    parts = [f"<section class='sample' data-id='{_e(row.get('id'))}'><h2>{_e(row.get('id'))}</h2>"]
    if frames:
        parts.append(_frame_strip(row, results))
    parts.append(f"<h3>question</h3><pre class='question'>{_e(row.get('question', ''))}</pre>"
                 f"<p>reference answer: <b>{_e(row.get('answer', ''))}</b></p>"
                 f"<h3>completion</h3><pre class='completion'>{_e(row.get('completion', ''))}</pre>")
    parts.append(_claims(details))
    parts.append(_verdict(details))
    rewards = [k for k in ("accuracy", "format", "tar") if k in row]
    parts.append("<h3>rewards</h3><table><tr>" + "".join(f"<th>{k}</th>" for k in rewards) + "</tr><tr>"
                 + "".join(f"<td class='reward' data-name='{k}'>{_number(row[k])}</td>" for k in rewards)
                 + "</tr></table></section>")
    return "".join(parts)


def _claims(details: dict) -> str:
    claims, matches, events = details.get("claims"), details.get("matches") or [], details.get("events") or []
    buffer, threshold = details.get("buffer_seconds"), details.get("similarity_threshold")
    head = (f"<h3>claims</h3><p>matching rule: spans overlap once each is widened by {_number(buffer)} s, "
            f"and similarity &ge; {_number(threshold)}; each reference event is matched at most once.</p>")
    if claims is None:
        return head + "<p class='no-claims'>the judge was not asked (no reasoning or no reference) or did not answer.</p>"
    if not matches:
        found = f" (it returned {_e(json.dumps(claims))}, none with a readable time)" if claims else ""
        return head + f"<p class='no-claims'>the judge found no timestamped claim{found}.</p>"
    rows = ["<table class='claims'><tr><th>claim time</th><th>claim</th><th>reference event</th>"
            "<th>overlap (with buffer)</th><th>similarity</th><th>matched</th></tr>"]
    for m in matches:
        matched = m.get("event")
        for j, (start, end, text) in enumerate(events):
            overlap, similarity = m["candidates"][j] if j < len(m["candidates"]) else (False, float("nan"))
            first = j == 0
            rows.append(
                f"<tr class='claim' data-key='{_e(_span(m['start'], m['end']))}' data-event='{j}' "
                f"data-matched='{'' if matched is None else matched}'>"
                + (f"<td rowspan='{len(events)}'>{_e(_span(m['start'], m['end']))}</td>"
                   f"<td rowspan='{len(events)}'>{_e(m['text'])}</td>" if first else "")
                + f"<td>{_e(_span(start, end))}: {_e(text)}</td>"
                f"<td class='{'yes' if overlap else 'no'}'>{'yes' if overlap else 'no'}</td>"
                f"<td class='{'yes' if similarity >= (threshold or 0) else 'no'}'>{similarity:.3f}</td>"
                f"<td class='{'yes' if matched == j else ''}'>{'&#10003; matched' if matched == j else ''}</td></tr>"
            )
    rows.append("</table>")
    alignment = details.get("alignment")
    hits = sum(m.get("event") is not None for m in matches)
    rows.append(f"<p>alignment = {hits} matched / {len(matches)} claims = {_number(alignment)}</p>")
    return head + "".join(rows)


def _verdict(details: dict) -> str:
    consistent = details.get("consistent")
    text = {True: "consistent: the reasoning supports the answer", False: "not consistent",
            None: "unknown (not asked, or the judge did not answer)"}[consistent]
    gate = ("TAR = alignment &times; verdict" if details.get("gated")
            else "the gate did not apply (alignment 0 or no answer)")
    value = "" if consistent is None else str(consistent).lower()
    return (f"<h3>consistency gate</h3><p class='verdict' data-consistent='{value}'>{text}; {gate}; "
            f"TAR = {_number(details.get('reward'))}</p>")


def _frame_strip(row: dict, results: dict) -> str:
    """The sampled frames side by side, drawn on as the model saw them, as an inline PNG."""
    try:
        uri, times = _strip_uri(row, results)
    except Exception as error:  # a moved video must not stop the rest of the report
        return f"<p class='frames-missing'>frames unavailable: {_e(error)}</p>"
    # The drawn time can be clipped on tiny frames; the caption gives every frame's time in full.
    caption = ", ".join(f"{t:.1f}" for t in times)
    return (f"<img class='strip' alt='sampled frames' src='{uri}'>"
            f"<p class='frame-times'>frames at {caption} s</p>")


def _strip_uri(row: dict, results: dict) -> tuple[str, list[float]]:
    import torch
    from PIL import Image

    from video_r2.video import parse_srt, sample_frames

    if not row.get("video") or not results.get("video_folder"):
        raise ValueError("the evaluation does not say which video this sample is")
    path = Path(results["video_folder"]) / row["video"]
    s = results.get("sampling") or {}
    srt = Path(results["subtitles_folder"]) / f"{Path(row['video']).stem}.srt" if results.get("subtitles_folder") else None
    cues = parse_srt(srt) if srt is not None and srt.is_file() else None
    frames, times = sample_frames(
        path, s.get("fps", 2.0), s.get("max_frames", 32), s.get("min_frames", 4),
        s.get("video_min_pixels", 3136), s.get("video_max_pixels", 360 * 420),
        positions=s.get("frame_positions", "linspace"), cues=cues,
        draw_timestamps=results.get("draw_timestamps", True), draw_subtitles=results.get("draw_subtitles", True),
    )
    strip = torch.cat(list(frames), dim=2).permute(1, 2, 0).numpy()  # [H, T*W, 3]
    image = Image.fromarray(strip)
    if image.height < 112:  # tiny frames: enlarge so that the drawn times are legible
        scale = 112 // image.height + 1
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), list(times)
