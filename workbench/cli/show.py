"""``workbench show``: a few heads' attention on one prompt, as one offline HTML file.

The command-line face of :func:`workbench.report.patterns.attention_pattern`: the query x key
square for short prompts, the token strip of chosen query rows for long ones, computed for the
named heads and rows only (:mod:`workbench.engine.rows`). The file inlines plotly.js and the
figure's data the way the report does (:mod:`workbench.report.page`: one JSON block, ``<``, ``>``
and ``&`` escaped, so no token can close a script tag), so it opens with no network, unlike a
saved CircuitsVis figure, which loads its bundle from a CDN.

Every input is checked before the model loads (heads' syntax, query rows' syntax, the output
path, the prompt source); what needs the model (a head beyond its layers, a query row beyond the
prompt, an empty prompt) is checked before the forward.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli.common import add_command, add_dataset_options, add_model_args, dataset_options, int_list, whole
from workbench.errors import WorkbenchError

HTML_SUFFIXES = (".html", ".htm")


def parse_heads(raw: str) -> list[tuple[int, int]]:
    """``"1.3,0.2"`` -> ``[(1, 3), (0, 2)]`` (layer.head, the atlas' notation)."""
    heads = []
    for part in (p.strip() for p in raw.split(",")):
        layer, dot, head = part.partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise WorkbenchError(
                f"--heads: {part!r} is not LAYER.HEAD",
                "name heads as layer.head, comma-separated, e.g. --heads 18.6,3.1",
            )
        heads.append((int(layer), int(head)))
    return heads


def parse_queries(raw: str | None) -> list[int] | None:
    """``"5,-1"`` -> ``[5, -1]`` (negative: from the end); None when not given."""
    if raw is None:
        return None
    out = int_list(raw, "--queries", "0,12,-1")
    if not out:
        raise WorkbenchError("--queries is empty", "give at least one query row, or leave --queries out")
    return out


def _check_out(out: str) -> Path:
    from workbench.files.atomic import check_folder

    path = Path(out)
    if path.suffix.lower() not in HTML_SUFFIXES:
        raise WorkbenchError(f"--out {out!r} is not an .html file", "name the output file e.g. --out head.html")
    if path.is_dir():
        raise WorkbenchError(f"--out {out} is a folder", "give a file name, e.g. --out head.html")
    check_folder(path.parent, "--out", path)
    return path


def _prompt(args: argparse.Namespace, model=None):
    """The one prompt to show: ``--text``, ``--tokens``, or one of ``--prompts`` / ``--dataset``
    (``--prompt-id``, else the first). Token-space datasets need the model (``model=None``: the
    sources are checked, None returned)."""
    from workbench.inputs.prompts import Prompt

    sources = [x for x in ("text", "tokens", "prompts", "dataset") if getattr(args, x) is not None]
    if len(sources) != 1:
        raise WorkbenchError(
            "give one prompt source" + (f", not {len(sources)}" if sources else ""),
            "use one of --text, --tokens, --prompts FILE or --dataset NAME",
        )
    if args.text is not None:
        return Prompt("text", text=args.text)
    if args.tokens is not None:
        try:
            return Prompt("tokens", tokens=[int(t) for t in args.tokens.split(",") if t.strip()])
        except ValueError:
            raise WorkbenchError(
                f"--tokens: {args.tokens!r} is not a list of token ids", "give token ids as e.g. --tokens 1,42,7"
            ) from None
    return _from_collection(args, model)


def _from_collection(args: argparse.Namespace, model):
    from workbench.datasets import NEEDS_TOKENIZER, make_dataset
    from workbench.inputs.prompts import read_prompts

    if args.prompts is not None:
        prompts = read_prompts(args.prompts)
    elif args.dataset in NEEDS_TOKENIZER and model is None:
        dataset_options(args)
        return None
    else:
        tok = model.tokenizer if model is not None else None
        prompts = make_dataset(args.dataset, n_prompts=1 if args.prompt_id is None else None, seed=args.seed,
                               tokenizer=tok, **dataset_options(args))  # fmt: skip
    if args.prompt_id is None:
        if not prompts:
            raise WorkbenchError("no prompts to show", "give a prompts file with at least one prompt")
        return prompts[0]
    chosen = [p for p in prompts if p.id == args.prompt_id]
    if not chosen:
        raise WorkbenchError(
            f"--prompt-id {args.prompt_id!r} is not in the prompts",
            f"choose one of {', '.join(p.id for p in prompts[:5])}{', ...' if len(prompts) > 5 else ''}",
        )
    return chosen[0]


def html_page(fig, title: str, caption: str) -> str:
    """One self-contained page: plotly.js inlined, the figure's data in one escaped JSON block."""
    from plotly.offline import get_plotlyjs

    from workbench.report.page import CSS, JS, Page, esc, safe_json

    page = Page()
    page.figure(fig, esc(caption))
    template = f'<script id="wb-template" type="application/json">{safe_json(page.template)}</script>'
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
        f"{''.join(page.parts)}"
        f'<script id="wb-figures" type="application/json">{safe_json(page.figures)}</script>{template}'
        f"<script>{get_plotlyjs()}</script><script>{JS}</script></body></html>"
    )


def cmd_show(args: argparse.Namespace) -> int:
    from workbench.files.atomic import atomic_write_text
    from workbench.inputs.prompts import tokenize_prompts
    from workbench.models.loading import load_model
    from workbench.report.patterns import attention_pattern, head_name

    heads = parse_heads(args.heads)
    queries = parse_queries(args.queries)
    out = _check_out(args.out)
    prompt = _prompt(args)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    prompt = prompt or _prompt(args, model)
    (tokens,) = tokenize_prompts([prompt], model.tokenizer, model.n_ctx, model.vocab_size)
    fig = attention_pattern(model, tokens.ids, heads, queries, view=args.view, max_square=args.max_square)
    names = ", ".join(head_name(h) for h in heads)
    title = f"{args.model}: {names}"
    caption = f"prompt {prompt.id!r}, {len(tokens.ids)} tokens; heads {names}"
    atomic_write_text(out, html_page(fig, title, caption))
    print(f"wrote {out} ({len(tokens.ids)} tokens, heads {names})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "show",
        "draw a few heads' attention on one prompt as an offline HTML file",
        "workbench show --model smollm2-135m --heads 4.0,18.6 --text 'the cat sat on the mat' --out head.html",
    )
    add_model_args(p)
    p.add_argument("--heads", required=True, help="heads as layer.head, comma-separated, e.g. 18.6,3.1")
    p.add_argument(
        "--queries",
        help="query rows, comma-separated, negative from the end: --queries -1,40 (default: all / the last)",
    )
    p.add_argument("--view", choices=["auto", "square", "strip"], default="auto", help="square (T x T) or token strip")
    p.add_argument("--max-square", type=whole(1), default=64, help="auto: the square up to this many tokens")
    src = p.add_argument_group("prompt (one of)")
    src.add_argument("--text", help="the prompt's text (tokenized as the model's tokenizer does by default)")
    src.add_argument("--tokens", help="the prompt's token ids, comma-separated, used exactly")
    src.add_argument("--prompts", help="a JSONL prompts file; the first prompt, or --prompt-id")
    src.add_argument("--dataset", help="a dataset (see `workbench datasets`); its first prompt, or --prompt-id")
    src.add_argument("--prompt-id", help="which prompt of --prompts / --dataset")
    src.add_argument("--seed", type=whole(0), default=0, help="--dataset: its seed")
    add_dataset_options(src)
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.set_defaults(func=cmd_show)
