"""Argument groups and value parsers shared by every command group, defined once.

Each command module (``workbench/cli/<group>.py``) registers its own subcommands and flags
next to its handlers, and takes the common pieces from here: the model flags, the input
flags (prompts file / dataset / items), batch size, probe parameters and the output path.
Parsers here raise :class:`~workbench.errors.WorkbenchError` so a bad value becomes one
``error:`` line naming the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from workbench.errors import WorkbenchError
from workbench.inputs.batching import parse_batch_size  # noqa: F401  (re-exported for the command modules
from workbench.protocol.params import parse_cli_value

MODEL_HELP = "known name (see `workbench models`), local HF folder or hub id (default smollm2-135m)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UsageError(Exception):
    """A command-line usage mistake found by argparse (unknown flag, bad value for a typed flag)."""


class Parser(argparse.ArgumentParser):
    """argparse with the workbench's error format: one ``error:`` line and a ``fix:`` line
    (instead of a usage dump), exit status 2, raised to :func:`workbench.cli.main`."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def whole(minimum: int | None = None, maximum: int | None = None):
    """An argparse type: a whole number within bounds."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, above: float | None = None):
    """An argparse type: a finite number within bounds (NaN and infinities refused)."""
    import math

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {raw!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {value:g}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be > {above:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def add_command(
    sub: argparse._SubParsersAction, name: str, summary: str, example: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand with a one-line purpose (shown by ``workbench --help``) and an example."""
    return sub.add_parser(
        name,
        help=summary,
        description=description or summary[:1].upper() + summary[1:] + ".",
        epilog="example:\n  " + example.strip().replace("\n", "\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --device and --dtype, the same for every command that runs a model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    group.add_argument("--dtype", default=None, help="float32 (the default), bfloat16 or float16")


def add_dataset_options(group: argparse._ArgumentGroup) -> None:
    """Options of the generated datasets (niah, repeated-random)."""
    group.add_argument("--context-len", help="niah: context lengths in tokens, comma list (default 1024)")
    group.add_argument("--depths", help="niah: needle depths in [0, 1], comma list (default 0,0.25,0.5,0.75,1)")
    group.add_argument("--period", type=whole(2), help="repeated-random: length of the repeated block (default 50)")
    group.add_argument(
        "--shared-haystack", action="store_true", help="niah: one haystack for every prompt (the paper's grid)"
    )


def add_input_args(parser: argparse.ArgumentParser, items: bool = False) -> None:
    """--prompts / --dataset / --n-prompts / --seed (+ dataset options; + --images/--text)."""
    group = parser.add_argument_group("inputs")
    group.add_argument(
        "--prompts", help="JSONL file: one {id, text|tokens} object per line (items: + image or context)"
    )
    group.add_argument("--dataset", help="shipped or generated dataset (see `workbench datasets`; default prose)")
    group.add_argument(
        "--n-prompts", type=whole(1), help="how many prompts (dataset size, or the first N of --prompts)"
    )
    group.add_argument("--seed", type=whole(0), default=0)
    if items:
        group.add_argument(
            "--images", help="an image file or a folder of images, each run with --text (vision-language models)"
        )
        group.add_argument("--text", help="with --images: the prompt, with the image placeholder (e.g. <image>)")


def add_batch_size(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument(
        "--batch-size", default=default, help="items per forward pass, or auto (a token budget per batch)"
    )


def comma_list(raw: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: a comma-separated option's non-empty names."""
    return [x.strip() for x in raw.split(",") if x.strip()]


def int_list(raw: str, flag: str, example: str) -> list[int]:
    """``"5,-1"`` -> ``[5, -1]``: a comma-separated option's whole numbers (``example``: its value
    in the error's fix, e.g. ``"0,12,-1"``)."""
    try:
        return [int(x) for x in comma_list(raw)]
    except ValueError:
        raise WorkbenchError(
            f"{flag} takes comma-separated whole numbers, got {raw!r}", f"e.g. {flag} {example}"
        ) from None


def float_list(raw: str | None, flag: str) -> list[float] | None:
    if raw is None:
        return None
    try:
        return [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise WorkbenchError(f"{flag} takes comma-separated numbers, got {raw!r}", f"e.g. {flag} 0,0.5,1") from None


def int_ranges(raw: str, flag: str) -> list[int]:
    """``"2,17-29"`` -> ``[2, 17, 18, ..., 29]``."""
    out: list[int] = []
    try:
        for part in (x.strip() for x in raw.split(",") if x.strip()):
            lo, dash, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    except ValueError:
        raise WorkbenchError(f"{flag} takes layer numbers and ranges, got {raw!r}", f"e.g. {flag} 2,17-29") from None
    return out


def parse_params(items: Sequence[str], probe_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--param sink.epsilon=0.2`` (repeatable) -> ``{"sink": {"epsilon": 0.2}}``."""
    from workbench.protocol.registry import probe_class

    params: dict[str, dict[str, Any]] = {n: {} for n in probe_names}
    for item in items or []:
        key, sep, raw = item.partition("=")
        probe, dot, pname = key.partition(".")
        if not sep or not dot or not pname:
            raise WorkbenchError(f"bad --param {item!r}", "write --param PROBE.NAME=VALUE, e.g. sink.epsilon=0.2")
        if probe not in params:
            raise WorkbenchError(
                f"--param {item!r} names probe {probe!r}, which is not in this run",
                f"probes in this run: {', '.join(probe_names)}",
            )
        params[probe][pname] = parse_cli_value(raw, probe_class(probe).Params, pname)
    return params


def check_parquet_out(path: str) -> None:
    from workbench.runs.parquet import check_writable

    if not str(path).endswith(".parquet"):
        raise WorkbenchError(f"--out {path} should end in .parquet", "e.g. --out results.parquet")
    check_writable(path)


def dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """Dataset options given on the command line, validated before any model loads."""
    opts: dict[str, Any] = {}
    lengths = float_list(getattr(args, "context_len", None), "--context-len")
    if lengths is not None:
        opts["context_len"] = [int(x) for x in lengths]
    depths = float_list(getattr(args, "depths", None), "--depths")
    if depths is not None:
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise WorkbenchError(
                f"depth {bad[0]:g} is outside [0, 1]", "give depths as fractions of the context, e.g. --depths 0,0.5,1"
            )
        opts["depths"] = depths
    if getattr(args, "period", None) is not None:
        opts["period"] = args.period
    if getattr(args, "shared_haystack", False):
        opts["shared_haystack"] = True
    return opts


def load_inputs(args: argparse.Namespace, model=None):
    """Prompts or items from ``--images [--text]``, ``--prompts`` or ``--dataset`` (default prose).

    Returns ``(prompts, dataset name, root folder for relative paths in items)``; ``prompts`` is
    None for a token-space dataset (niah, repeated-random) until the model's tokenizer is given.
    """
    from pathlib import Path

    from workbench.datasets import NEEDS_TOKENIZER, make_dataset
    from workbench.inputs.prompts import Prompt, read_prompts

    images = getattr(args, "images", None)
    if sum(bool(x) for x in (images, args.prompts, args.dataset)) > 1:
        raise WorkbenchError("give one of --images, --prompts or --dataset", "drop the others")
    if images:
        path = Path(images)
        if not path.exists():
            raise WorkbenchError(f"--images {path} does not exist", "give an image file or a folder of images")
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise WorkbenchError(f"no image files in {path}", f"put {', '.join(IMAGE_SUFFIXES)} files there")
        if not getattr(args, "text", None):
            raise WorkbenchError("--images needs --text", "e.g. --text 'USER: <image>\nDescribe the image. ASSISTANT:'")
        items = [Prompt(f.stem, text=args.text, meta={"image": str(f.resolve())}) for f in files]
        return items[: args.n_prompts] if args.n_prompts else items, path.name, None
    if args.prompts:
        prompts = read_prompts(args.prompts)
        return (
            (prompts[: args.n_prompts] if args.n_prompts else prompts),
            os.path.basename(args.prompts),
            Path(args.prompts).resolve().parent,
        )
    name = args.dataset or "prose"
    opts = dataset_options(args)
    if name in NEEDS_TOKENIZER:
        if model is None:
            return None, name, None
        opts["tokenizer"] = model.tokenizer
        if name == "niah":
            opts["n_ctx"] = model.n_ctx
    return make_dataset(name, n_prompts=args.n_prompts, seed=args.seed, **opts), name, None


def make_interventions(args: argparse.Namespace, model) -> list:
    """``--ablate L.H,... --ablation zero|mean|first|flat`` as head-ablation observers."""
    from workbench.engine.interventions import head_ablation, head_means, parse_heads

    if not getattr(args, "ablate", None):
        return []
    heads = parse_heads(args.ablate, model.n_layers, model.n_heads)
    means = None
    if args.ablation == "mean":
        from workbench.datasets import make_dataset
        from workbench.inputs.prompts import tokenize_prompts

        ref = tokenize_prompts(
            make_dataset("prose", n_prompts=16, seed=12345), model.tokenizer, model.n_ctx, model.vocab_size
        )
        means = head_means(model, ref)
    return [head_ablation(heads, args.ablation, means)]


def write_table(table: Any, out: str, **meta: Any) -> Any:
    """The tail of every command that writes a results table: the run's metadata (``meta`` plus
    package versions, time and this command line, :func:`workbench.runs.parquet.run_metadata`) and
    the atomic write of ``table`` to ``out`` (a path or an fsspec URL). Returns where it was written."""
    import sys

    from workbench.runs.parquet import run_metadata, write_parquet

    return write_parquet(table, out, run_metadata(**meta, command=sys.argv))


def finish_probe_run(
    table: Any, result: Any, probes: Sequence[Any], out: str, model_name: str, top: int, facts: str, **meta: Any
) -> None:
    """The tail of the commands that run probes: write ``table`` with ``meta`` (:func:`write_table`),
    print the top heads per metric with the run's ``facts``, then each probe's own lines."""
    from workbench.protocol.table import top_heads

    write_table(table, out, probes=[p.config() for p in probes], summaries=result.summaries(), **meta)
    print_top(top_heads(table, top), model_name, top, facts)
    for line in result.lines():
        print(line)


def print_top(top, model_name: str, k: int, footer: str) -> None:
    """The top heads per metric as a table, then one line of run facts."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"top {k} heads per metric ({model_name})")
    for col in ("probe", "metric", "layer.head", "value", "n"):
        table.add_column(col, justify="right" if col in ("value", "n") else "left")
    for row in top.itertuples():
        table.add_row(row.probe, row.metric, f"{row.layer}.{row.head}", f"{row.value:.4f}", str(row.n))
    console.print(table)
    console.print(footer)


# Commands whose --out may be an fsspec URL (s3://, gs://, file://): a sweep's run folder, and
# single files written whole (workbench.files.targets). The others write local files, for the reason given.
URL_OUTPUTS = {"sweep", "report", "probe", "patch", "reinforce", "retrieval-ablation"}
LOCAL_OUTPUTS = {
    "cache": "the activation store is read memory-mapped, which needs a file system",
    "circuit": "a circuit folder is written as a temporary folder renamed into place",
    "dataset": "a prompts file is an input of other commands (--prompts), which read local files",
    "task": "a pairs file is an input of other commands (--pairs), which read local files",
}


def check_out(command: str, out: str) -> None:
    """Every command's --out, before any work (a model load, a 4-minute discovery): a URL with an
    unknown protocol or a missing package (s3fs) is one error, as is a URL where only a path will do."""
    from workbench.files.targets import check_url, refuse_url

    if command in URL_OUTPUTS:
        check_url(out)
    else:
        refuse_url(out, f"`workbench {command}` --out", LOCAL_OUTPUTS.get(command, "it is written as local files"))
