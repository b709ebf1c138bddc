"""``inseq-semiring``: command line front end.

``inseq-semiring attribute [-m MODEL] [-a METHOD] [-i TEXT] [-t TARGET] [--sign ...] [--granularity ...]
[--decomposition aten|paper|primitive]``
    Attributes the generated ``TARGET`` (default ``" are"``) after ``TEXT`` (default ``"The keys to the cabinet"``)
    with a semiring method (default ``semiring_maxpath``) on ``MODEL`` (default ``smollm2``: the embedded
    SmolLM2-135M-Instruct; otherwise any Hugging Face model name or folder, decoder-only or encoder-decoder) and
    prints one score per input token and generated token, the whole-graph path entropy and the top path value.

``inseq-semiring paths [-m MODEL] [-i TEXT] [-t TARGET] [-k 3] [--sign abs] [--decomposition D] [--full] [--png FILE]``
    Decodes the best gradient paths into the first target token, labelled by component (embedding, layer k
    attention query/key/value/output, MLP, norm, LM head), prints them and optionally draws the top one.

``inseq-semiring build-kernels``
    Builds the compiled CPU kernels now (``scripts/setup.sh`` runs it) instead of on first use.
``inseq-semiring attribute-dataset --data ROWS.jsonl --out DIR [--workers N] ...``
    Every row of a dataset, resumable, in-process or on Ray actors (:mod:`inseq_semiring.scale.command`).

``inseq-semiring evaluate --data F.jsonl --methods a,b,c --out DIR [--model M] ...``
    Faithfulness and ground-truth evaluation of attribution methods (:mod:`inseq_semiring.evaluate`).

``inseq-semiring inseq {attribute,attribute-dataset,attribute-context} ...`` (or directly
``inseq-semiring attribute-context ...``, and ``attribute-dataset --dataset_name ...``)
    Inseq's own commands, unchanged, with the plugin methods available (``-a semiring_maxpath``) and ``-m smollm2``
    mapped to the embedded model's local folder.

Bad input (empty text, a target beyond the model's context, unknown method or option value, an architecture the
engine cannot trace) ends with a one-line ``inseq-semiring: error: ...`` and exit status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence, TextIO

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
PLUGIN_METHODS = ("semiring_maxpath", "semiring_entropy", "semiring_flow", "semiring_gradient")
INSEQ_COMMANDS = ("attribute", "attribute-dataset", "attribute-context")
DEFAULT_MODEL = "smollm2"
DEFAULT_INPUT = "The keys to the cabinet"
DEFAULT_TARGET = " are"
_TAG = "[inseq-semiring]"


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _say(msg: str, stream: TextIO | None = None) -> None:
    print(f"{_TAG} {msg}", file=stream or sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


# ------------------------------------------------------------------------------------------------------------------
# model loading
# ------------------------------------------------------------------------------------------------------------------
def _load_attribution_model(name: str, method: str, options: dict[str, str]):
    """An Inseq attribution model for ``name`` (``"smollm2"`` or any HF model name / folder) with ``method``."""
    import inseq

    from .integrations.inseq import register

    register()
    if name == DEFAULT_MODEL:
        from .models.smollm2 import ModelNotAvailableError, load_smollm2

        try:
            model, tokenizer = load_smollm2()
        except ModelNotAvailableError as e:
            raise CLIError(_one_line(e)) from e
        return inseq.load_model(model, method, tokenizer=tokenizer, **options)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        if not os.path.isdir(name):
            raise CLIError(f"no model folder '{name}' (and '{DEFAULT_MODEL}' is the embedded default); give a folder "
                           "with a config.json or a Hugging Face model name available offline") from e
        raise CLIError(f"cannot load model {name!r}: {_one_line(e)}") from e
    _check_architecture(name, config)
    try:
        return inseq.load_model(name, method, **options)
    except (OSError, ValueError, KeyError) as e:
        if "option" in str(e) and method in str(e):
            raise
        raise CLIError(f"cannot load model {name!r} as a causal or sequence-to-sequence language model: "
                       f"{_one_line(e)}") from e


def _check_architecture(name: str, config) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    table = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES if config.is_encoder_decoder else \
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    archs = [a for a in (getattr(config, "architectures", None) or [])]
    generative = [a for a in archs if a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))]
    if kind not in table or (archs and not generative):
        raise CLIError(f"unsupported architecture for {name!r}: model type {kind!r} "
                       f"({', '.join(archs) or 'no architecture listed'}) is not a causal or sequence-to-sequence "
                       "language model; use a decoder-only (e.g. GPT-2, Llama) or encoder-decoder (e.g. T5, BART) "
                       "model")


def _max_positions(model) -> int | None:
    cfg = model.model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(model.tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


# ------------------------------------------------------------------------------------------------------------------
# `inseq-semiring attribute`
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class AttributeContext:
    """Everything the ``attribute`` subcommand knows once attribution is done (handed to the print hooks)."""

    attribution_model: Any  # the Inseq AttributionModel (``.model``: the HF model, ``.tokenizer``)
    input_text: str
    generated_text: str
    output: Any  # inseq.FeatureAttributionOutput
    method: str
    options: dict[str, str]
    stream: TextIO = field(default_factory=lambda: sys.stdout)


def _check_texts(model, text: str, target: str) -> None:
    """Empty texts (always) and, once the model is loaded, input + target beyond the model's context."""
    if not text or not text.strip():
        raise CLIError("the input text is empty; pass some text with -i/--input")
    if not target or not target.strip():
        raise CLIError("the target text is empty; pass the generated continuation to explain with -t/--target")
    if model is None:
        return
    limit = _max_positions(model)
    if limit is None:
        return
    tok = model.tokenizer
    n_in = len(tok(text).input_ids)
    n_tgt = len(tok(target, add_special_tokens=False).input_ids)
    total = max(n_in, n_tgt) if model.is_encoder_decoder else n_in + n_tgt
    if total > limit:
        raise CLIError(f"input + target are {n_in} + {n_tgt} tokens, longer than the model's context of {limit} "
                       "tokens; shorten the text or the target")


def _fmt(x: float) -> str:
    if x != x:  # NaN: not available at that step
        return ""
    return f"{x:.4g}"


def _token_label(tok) -> str:
    text = getattr(tok, "token", tok)
    return repr(text)


def _per_token_scores(seq):
    """(rows, columns, {"source"|"target": 2-D tensor}) of a sequence attribution, granular ones reduced by L2."""
    import torch

    blocks = {}
    for name in ("source", "target"):
        scores = getattr(seq, f"{name}_attributions")
        if scores is None:
            continue
        if scores.dim() == 3:  # granular (semiring_gradient): L2 norm over the hidden dimension, like vnorm
            scores = torch.linalg.vector_norm(scores, dim=-1)
        blocks[name] = scores.double()
    return blocks


def _print_table(ctx: AttributeContext) -> None:
    seq = ctx.output.sequence_attributions[0]
    out = ctx.stream
    generated = seq.target[seq.attr_pos_start:seq.attr_pos_end]
    heads = [_token_label(t) for t in generated]
    blocks = _per_token_scores(seq)
    rows = []
    if "source" in blocks:
        rows += [("source", _token_label(t), blocks["source"][i]) for i, t in enumerate(seq.source)]
    if "target" in blocks:
        tgt = blocks["target"]
        rows += [("target" if "source" in blocks else "", _token_label(t), tgt[i]) for i, t in enumerate(seq.target)
                 if i < tgt.shape[0] and not bool(tgt[i].isnan().all())]
    width = max([len(r[1]) for r in rows] + [5]) + (9 if "source" in blocks else 0)
    colw = max([len(h) for h in heads] + [10])
    opts = ", ".join(f"{k}={v}" for k, v in ctx.options.items())
    print(f"method: {ctx.method}" + (f" ({opts})" if opts else "") +
          f"   root: {ctx.output.info.get('attributed_fn', 'probability_fn')} of each generated token", file=out)
    print(f"{'token':<{width}}  " + "  ".join(f"{h:>{colw}}" for h in heads), file=out)
    for side, label, values in rows:
        name = f"{side + ':':<8} {label}" if side else label
        print(f"{name:<{width}}  " + "  ".join(f"{_fmt(float(v)):>{colw}}" for v in values), file=out)


def _print_step_scores(ctx: AttributeContext) -> None:
    seq = ctx.output.sequence_attributions[0]
    scores = seq.step_scores or {}
    generated = seq.target[seq.attr_pos_start:seq.attr_pos_end]
    for key, label in (("semiring_entropy", "path entropy (whole graph, nats)"),
                       ("semiring_top_path", "top path value"),
                       ("semiring_log_total_flow", "log total flow (whole graph, nats)")):
        if key in scores:
            values = ", ".join(f"{_token_label(t)}: {_fmt(float(v))}" for t, v in zip(generated, scores[key]))
            print(f"{label}: {values}", file=ctx.stream)


def _print_top_path(ctx: AttributeContext) -> None:
    """Print the best gradient path (scalar granularity) into the first generated token, labelled by component."""
    from .model_paths import find_top_paths

    am = ctx.attribution_model
    target = ctx.generated_text if am.is_encoder_decoder else ctx.generated_text[len(ctx.input_text):]
    sign = ctx.options.get("sign", "abs") if ctx.method == "semiring_maxpath" else "abs"
    found = find_top_paths(am.model, am.tokenizer, ctx.input_text, target, k=1, sign=sign,
                           decomposition=ctx.options.get("decomposition"))
    print(f"top path ({sign}) into log p(first generated token):", file=ctx.stream)
    print(found.to_text(), file=ctx.stream)
    if "prob" in str(ctx.output.info.get("attributed_fn", "probability")):
        print("(the scores above use Inseq's root p(token); this path uses log p, so its value is larger by 1/p)",
              file=ctx.stream)


def _check_outputs(args: argparse.Namespace, **flags: str) -> None:
    """Every output path of the command (attribute name -> flag) is writable, before any model is loaded."""
    from .output_files import OutputPathError, check_output_file

    for attr, flag in flags.items():
        path = getattr(args, attr, None)
        if path:
            try:
                check_output_file(path, flag, overwrite=args.overwrite)
            except OutputPathError as e:
                raise CLIError(str(e)) from e


def _cmd_paths(args: argparse.Namespace) -> int:
    """``paths``: the top-k gradient paths as text (``--full``: every operator) and, with ``--png``, a figure."""
    from .model_paths import find_top_paths

    _check_texts(None, args.input, args.target)
    from .decompositions import resolve

    resolve(args.decomposition)  # fail before the (slow) model load
    _check_outputs(args, png="--png")
    t0 = time.perf_counter()
    _say(f"loading model {args.model} ...")
    am = _load_attribution_model(args.model, "semiring_maxpath", {})
    _check_texts(am, args.input, args.target)
    _say(f"model ready ({time.perf_counter() - t0:.1f} s); decoding the top {args.k} path(s) ...")
    found = find_top_paths(am.model, am.tokenizer, args.input, args.target, k=args.k, sign=args.sign,
                           decomposition=args.decomposition, rules=getattr(args, "rules", None))
    print(found.to_text(full=args.full))
    if args.png:
        from .output_files import atomic_output
        from .viz import save

        with atomic_output(args.png) as tmp:
            save(found.figure(0), tmp)
        _say(f"figure of path #1 saved to {args.png}")
    return 0


def _cmd_attribute(args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("sign", args.sign), ("granularity", args.granularity),
                                 ("decomposition", args.decomposition)) if v is not None}
    _check_texts(None, args.input, args.target)
    from .integrations.inseq import register

    register()[args.method].check_options(options)  # fail before the (slow) model load
    _check_outputs(args, save="--save")
    t0 = time.perf_counter()
    _say(f"loading model {args.model} ...")
    model = _load_attribution_model(args.model, args.method, options)
    _say(f"model ready ({model.model.__class__.__name__}, {time.perf_counter() - t0:.1f} s)")
    _check_texts(model, args.input, args.target)
    generated = args.target if model.is_encoder_decoder else args.input + args.target
    step_scores = [] if args.no_step_scores else ["semiring_entropy", "semiring_top_path"]
    if step_scores and args.method == "semiring_flow":  # per-token flow overflows float32 in deep models
        step_scores.append("semiring_log_total_flow")
    n_gen = len(model.tokenizer(args.target, add_special_tokens=False).input_ids)
    _say(f"attributing {n_gen} generated token(s) with {args.method}"
         + (" + whole-graph entropy and top path" if step_scores else "") + " ...")
    t1 = time.perf_counter()
    out = model.attribute(args.input, generated, method=args.method, step_scores=step_scores,
                          attribute_target=args.attribute_target, show_progress=not args.quiet,
                          pretty_progress=False, **options)
    _say(f"done in {time.perf_counter() - t1:.1f} s")
    ctx = AttributeContext(model, args.input, generated, out, args.method, options)
    _print_table(ctx)
    _print_step_scores(ctx)
    if not args.no_step_scores:
        _print_top_path(ctx)
    if args.save:
        from .output_files import atomic_output

        with atomic_output(args.save) as tmp:
            out.save(str(tmp), overwrite=True)
        _say(f"saved to {args.save}")
    return 0


def _cmd_build_kernels(args: argparse.Namespace) -> int:
    """``build-kernels``: build (or find in the cache) every compiled CPU kernel now, not on first use."""
    from .kernels import maxtimes, rowcore, signed_rowcore, xlogx
    from .kernels.extension import NO_EXT_ENV, _env_no_ext

    if _env_no_ext():
        _say(f"{NO_EXT_ENV}=1: the compiled kernels are not used; nothing to build")
        return 0
    for kernel in (maxtimes, rowcore, xlogx, signed_rowcore):
        ext = kernel.EXTENSION
        cached = ext.is_cached()
        t0 = time.perf_counter()
        ok = ext.load() is not None
        state = ("in the cache" if cached else f"built in {time.perf_counter() - t0:.0f} s") if ok else \
            "not available (the pure-PyTorch code will be used)"
        _say(f"{ext.what} kernel: {state} ({ext.build_dir()[1]})")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# pass-through to Inseq's CLI
# ------------------------------------------------------------------------------------------------------------------
def _map_model_argument(argv: list[str]) -> list[str]:
    """``-m smollm2`` -> the embedded model's converted local folder (Inseq's CLI loads models by name)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("-m", "--model_name_or_path") and i + 1 < len(out) and out[i + 1] == DEFAULT_MODEL:
            from .models.smollm2 import ModelNotAvailableError, ensure_converted

            try:
                out[i + 1] = str(ensure_converted())
            except ModelNotAvailableError as e:
                raise CLIError(_one_line(e)) from e
        elif a.startswith("--model_name_or_path=") and a.split("=", 1)[1] == DEFAULT_MODEL:
            from .models.smollm2 import ensure_converted

            out[i] = f"--model_name_or_path={ensure_converted()}"
    return out


def run_inseq_cli(argv: Sequence[str]) -> int:
    """Run Inseq's own CLI (``inseq <command> ...``) with the plugin registered."""
    from .integrations.inseq import register

    register()  # before inseq.commands is imported: its argument choices are frozen then
    argv = _map_model_argument(list(argv))
    from inseq.commands.cli import main as inseq_main

    old = sys.argv
    sys.argv = ["inseq", *argv]
    try:
        inseq_main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BAD_INPUT)
    finally:
        sys.argv = old
    return 0


# ------------------------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    from .experiments._common import positive_int

    return positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inseq-semiring",
        description="Semiring backpropagation (max-product paths, path entropy, flow) for language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    att = sub.add_parser("attribute", help="attribute a generated target with a semiring method and print the scores",
                         description="Attribute a generated target with a semiring method; prints one score per "
                                     "input token and generated token, the whole-graph path entropy and the top "
                                     "path value.")
    att.add_argument("-m", "--model", default=DEFAULT_MODEL,
                     help="'smollm2' (embedded SmolLM2-135M-Instruct, default) or a Hugging Face model name/folder")
    att.add_argument("-a", "--method", default="semiring_maxpath", choices=PLUGIN_METHODS,
                     help="attribution method (default: semiring_maxpath)")
    att.add_argument("-i", "--input", default=DEFAULT_INPUT, help=f"input text (default: {DEFAULT_INPUT!r})")
    att.add_argument("-t", "--target", default=DEFAULT_TARGET,
                     help=f"generated text to explain; for decoder-only models the continuation of the input "
                          f"(default: {DEFAULT_TARGET!r})")
    att.add_argument("--sign", default=None, help="maxpath option: abs (default), positive or negative")
    att.add_argument("--granularity", default=None, help="maxpath option: scalar (default) or tensor")
    att.add_argument("--decomposition", default=None,
                     help="operator graph: aten (default), paper (Du et al.'s library) or primitive")
    att.add_argument("--attribute-target", action="store_true",
                     help="encoder-decoder models: also attribute the target prefix")
    att.add_argument("--no-step-scores", action="store_true", help="skip the whole-graph entropy and top path")
    att.add_argument("--save", default=None, metavar="PATH", help="save the Inseq attribution output (JSON)")
    att.add_argument("--overwrite", action="store_true", help="replace an existing --save file")
    att.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pth = sub.add_parser("paths", help="print (and plot) the top gradient paths into the first target token",
                         description="Decode the best gradient paths (maxpath semiring, scalar granularity) from the "
                                     "k strongest input elements to log p(first target token).")
    pth.add_argument("-m", "--model", default=DEFAULT_MODEL, help="'smollm2' (default) or a HF model name/folder")
    pth.add_argument("-i", "--input", default=DEFAULT_INPUT, help=f"input text (default: {DEFAULT_INPUT!r})")
    pth.add_argument("-t", "--target", default=DEFAULT_TARGET, help=f"target text (default: {DEFAULT_TARGET!r})")
    pth.add_argument("-k", type=_positive_int, default=3, help="number of paths, >= 1 (default 3)")
    pth.add_argument("--sign", default="abs", choices=("abs", "positive", "negative"), help="maxpath sign")
    pth.add_argument("--decomposition", default=None,
                     help="operator graph: aten (default), paper (Du et al.'s library) or primitive")
    pth.add_argument("--rules", default=None, choices=("lrp_epsilon", "attn_lrp", "cp_lrp"),
                     help="relevance paths: maxpath over the graph edited by this LRP method's rules")
    pth.add_argument("--full", action="store_true", help="list every operator of each path")
    pth.add_argument("--png", default=None, metavar="PATH", help="save a figure of the top path (layers x positions)")
    pth.add_argument("--overwrite", action="store_true", help="replace an existing --png file")
    sub.add_parser("build-kernels", help="build the compiled CPU kernels now (otherwise built on first use)",
                   description="Build (or find in the cache) the compiled max-times, layer-norm core and weight-map "
                               "kernels. Without a C++ compiler, or with INSEQ_SEMIRING_NO_BUILD=1, nothing is built "
                               "and the pure-PyTorch code is used.")
    ins = sub.add_parser("inseq", help="run an Inseq command (attribute, attribute-dataset, attribute-context) with "
                                       "the plugin methods available", add_help=False)
    ins.add_argument("inseq_args", nargs=argparse.REMAINDER)
    from .scale import command as dataset_command  # `attribute-dataset --data ...`: dataset runs (scale/)

    dataset_command.add_parser(sub)
    from .evaluate import command as evaluate_command  # `evaluate`: faithfulness / ground-truth evaluation

    evaluate_command.add_parser(sub)
    for name in INSEQ_COMMANDS[2:]:
        p = sub.add_parser(name, help=f"Inseq's '{name}' command with the plugin methods available", add_help=False)
        p.add_argument("inseq_args", nargs=argparse.REMAINDER)
    return parser


def _dataset_command_wanted(argv: Sequence[str]) -> bool:
    from .scale.command import is_ours

    return is_ours(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = bool(argv) and argv[0] == "--debug"
    rest = argv[1:] if debug else argv
    passthrough = None
    if rest and rest[0] == "inseq":  # everything after 'inseq' goes to Inseq's CLI untouched (argparse would eat it)
        passthrough = rest[1:]
    elif rest and rest[0] in INSEQ_COMMANDS[1:]:
        passthrough = rest
        if rest[0] == "attribute-dataset" and _dataset_command_wanted(rest[1:]):
            passthrough = None
    args = None
    if passthrough is None:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
    try:
        if passthrough is not None:
            if not passthrough or passthrough[0] not in INSEQ_COMMANDS:
                raise CLIError(f"'inseq-semiring inseq' needs one of {', '.join(INSEQ_COMMANDS)}, e.g. "
                               "'inseq-semiring inseq attribute -m gpt2 -a semiring_maxpath -i \"Hello\"'")
            return run_inseq_cli(passthrough)
        if args.command == "paths":
            return _cmd_paths(args)
        if args.command == "build-kernels":
            return _cmd_build_kernels(args)
        if args.command == "evaluate":
            from .evaluate.command import run as run_evaluate

            return run_evaluate(args)
        if args.command == "attribute-dataset":
            from .scale.command import run as run_dataset

            return run_dataset(args)
        return _cmd_attribute(args)
    except KeyboardInterrupt:
        print("inseq-semiring: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, never a deep traceback (unless --debug)
        if debug:
            raise
        from .errors import SemiringError

        user_error = isinstance(e, (CLIError, SemiringError, ValueError, ImportError, OSError, AssertionError))
        print(f"inseq-semiring: error: {_one_line(e)}", file=sys.stderr)
        if not user_error:
            print("inseq-semiring: (unexpected failure; rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_BAD_INPUT if user_error else EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
