"""OSEDiff per-image metric logs (docs/design.md#osediff-log): parse them, and write ours in the same format.

A per-image line:
  24-10-23 17:36:18.451 - INFO: results_osediff/Canon_10_x1.png | PSNR: 29.260979; SSIM: 0.892310 | Runtime: 1.13 sec
The summary block (three lines):
  24-10-23 17:37:04.504 - INFO: <nothing>
  ===== Average Metrics for [results_osediff] =====
  PSNR: 27.9243; SSIM: 0.7835 | FID: 135.296586 | FID Runtime: 8.10 sec
Any metric names are accepted, in any number; the runtime and FID parts are optional. Every other line is
kept verbatim, so format_log(parse_log(text)) == text.
"""

import dataclasses
import datetime
import re

from smfsr_jax.core import files

METRIC_ORDER = ("PSNR", "SSIM", "LPIPS", "DISTS", "CLIPIQA", "NIQE", "MUSIQ", "MANIQA")
_TIMESTAMP = r"\d{2}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}"
_METRICS = r"[\w+\-]+: [^;\s]+(?:; [\w+\-]+: [^;\s]+)*"
_IMAGE_LINE = re.compile(rf"(?P<timestamp>{_TIMESTAMP}) - INFO: (?P<path>.+?) \| (?P<metrics>{_METRICS})"
                         r"(?: \| Runtime: (?P<runtime>\S+) sec)?")
_EMPTY_INFO_LINE = re.compile(rf"(?P<timestamp>{_TIMESTAMP}) - INFO: ")
_SUMMARY_TITLE = re.compile(r"===== Average Metrics for \[(?P<directory>.*)\] =====")
_SUMMARY_MEANS = re.compile(rf"(?P<metrics>{_METRICS})"
                            r"(?: \| FID: (?P<fid>\S+) \| FID Runtime: (?P<fid_runtime>\S+) sec)?")


def _parse_metrics(text: str) -> dict[str, float]:
    metrics = {}
    for pair in text.split("; "):
        name, value = pair.split(": ")
        metrics[name] = float(value)
    return metrics


def _format_metrics(metrics: dict[str, float], decimals: int) -> str:
    return "; ".join(f"{name}: {value:.{decimals}f}" for name, value in metrics.items())


def ordered(metrics: dict[str, float]) -> dict[str, float]:
    """Log names in OSEDiff's column order, then any others in their given order."""
    known = [name for name in METRIC_ORDER if name in metrics]
    return {name: metrics[name] for name in known + [n for n in metrics if n not in METRIC_ORDER]}


def timestamp(when: datetime.datetime | None = None) -> str:
    """OSEDiff's logger time format, %y-%m-%d %H:%M:%S.mmm."""
    return (when or datetime.datetime.now()).strftime("%y-%m-%d %H:%M:%S.%f")[:-3]


@dataclasses.dataclass
class ImageLine:
    timestamp: str
    path: str  # as logged: '<directory name>/<file name>'
    metrics: dict[str, float]  # log names in line order, 6 decimals
    runtime: float | None = None  # seconds, 2 decimals

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def format(self) -> str:
        line = f"{self.timestamp} - INFO: {self.path} | {_format_metrics(self.metrics, 6)}"
        return line if self.runtime is None else f"{line} | Runtime: {self.runtime:.2f} sec"


@dataclasses.dataclass
class Summary:
    timestamp: str
    directory: str
    means: dict[str, float]  # log names, 4 decimals
    fid: float | None = None
    fid_runtime: float | None = None

    def format(self) -> str:
        means = _format_metrics(self.means, 4)
        if self.fid is not None:
            means += f" | FID: {self.fid:.6f} | FID Runtime: {self.fid_runtime:.2f} sec"
        return f"{self.timestamp} - INFO: \n===== Average Metrics for [{self.directory}] =====\n{means}"


@dataclasses.dataclass
class OSEDiffLog:
    entries: list  # in file order: ImageLine, Summary, or a verbatim line (str)

    @property
    def images(self) -> dict[str, ImageLine]:
        """{file name: line}, in log order."""
        return {e.file_name: e for e in self.entries if isinstance(e, ImageLine)}

    @property
    def summaries(self) -> list[Summary]:
        return [e for e in self.entries if isinstance(e, Summary)]


def parse_log(text: str) -> OSEDiffLog:
    lines = text.split("\n")
    entries, i = [], 0
    while i < len(lines):
        image = _IMAGE_LINE.fullmatch(lines[i])
        if image:
            runtime = image.group("runtime")
            entries.append(ImageLine(image.group("timestamp"), image.group("path"),
                                     _parse_metrics(image.group("metrics")),
                                     None if runtime is None else float(runtime)))
            i += 1
            continue
        empty = _EMPTY_INFO_LINE.fullmatch(lines[i])
        title = _SUMMARY_TITLE.fullmatch(lines[i + 1]) if empty and i + 2 < len(lines) else None
        means = _SUMMARY_MEANS.fullmatch(lines[i + 2]) if title else None
        if means:
            fid, fid_runtime = means.group("fid"), means.group("fid_runtime")
            entries.append(Summary(empty.group("timestamp"), title.group("directory"),
                                   _parse_metrics(means.group("metrics")),
                                   None if fid is None else float(fid),
                                   None if fid_runtime is None else float(fid_runtime)))
            i += 3
            continue
        entries.append(lines[i])
        i += 1
    return OSEDiffLog(entries)


def read_log(path) -> OSEDiffLog:
    return parse_log(files.read_text(path))


def format_log(log: OSEDiffLog) -> str:
    return "\n".join(e if isinstance(e, str) else e.format() for e in log.entries)


def evaluation_log(sr_dir: str, hr_dir: str | None, per_image: dict, means: dict, runtimes: dict,
                   skipped: dict) -> OSEDiffLog:
    """Our log in OSEDiff's layout. `per_image` {file: {log name: score}} and `means` {log name: score}
    are in log names; `skipped` {file: reason} are listed before the summary."""
    now = timestamp()
    directory = sr_dir.rstrip("/").rsplit("/", 1)[-1]
    total = len(per_image) + len(skipped)
    entries = [
        f"{now} - INFO: ===== Configuration =====",
        f"{now} - INFO:   inp_imgs: [{sr_dir!r}]",
        f"  gt_imgs: [{hr_dir!r}]" if hr_dir else "  gt_imgs: []",
        "",
        f"{now} - INFO: Directory [{directory}]: {total if hr_dir else 0} GT images vs {total} SR images.",
        f"{now} - INFO: Testing Directory: [{directory}]",
    ]
    for name, scores in per_image.items():
        entries.append(ImageLine(now, f"{directory}/{name}", ordered(scores), runtimes.get(name)))
    for name, reason in skipped.items():
        entries.append(f"{now} - INFO: Skipped {directory}/{name}: {reason}")
    entries.append(Summary(now, directory, ordered(means)))
    entries += ["", f"{now} - INFO: Evaluated {len(per_image)} images, skipped {len(skipped)}.",
                f"{now} - INFO: ===== Evaluation Completed =====", ""]
    return OSEDiffLog(entries)
