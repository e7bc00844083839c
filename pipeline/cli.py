"""`python -m pipeline <command> --config FILE`: one command per stage.

The Makefile calls these; they also work on their own. Every command loads
and validates the config first, so a bad config stops before anything is
written. Exit codes: 0 done, 1 a stage failed, 2 bad config or input,
3 Ollama not available (`ollama-status`), 4 the run folder is locked by
another build (`locked --no-wait`).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .config import load_config, make_path
from .errors import PipelineError
from .families import supported

EXIT_NO_OLLAMA = 3
# The supported families, each of which pipeline.tiny builds a test model of (tests/test_family_vocab.py
# checks that the two agree); from the registry, so that parsing the command line imports no torch.
TINY_FAMILIES = tuple(f.name for f in supported())


def _cmd_plan(args) -> int:
    from .plan import write_plan

    print(make_path(write_plan(load_config(args.config))))  # what pipeline.mk includes
    return 0


def _cmd_locked(args) -> int:
    from .config import ConfigError
    from .runlock import exec_locked

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if not command:
        raise PipelineError("locked: give the command to run after --, e.g. -- make -f pipeline.mk gguf")
    try:
        cfg = load_config(args.config)
    except ConfigError:
        # Nothing can be built from a bad config: let the command (make's plan) report it.
        os.execvp(command[0], command)
    exec_locked(cfg.run_dir, command, wait=not args.no_wait)
    return 0  # not reached: exec_locked replaces this process


def _cmd_check(args) -> int:
    cfg = load_config(args.config)
    print(f"{args.config}: OK (run {cfg.run.name!r}, artifacts in {cfg.run_dir})")
    return 0


def _cmd_data(args) -> int:
    from .data.prepare import prepare_data

    prepare_data(load_config(args.config))
    return 0


def _cmd_train(args) -> int:
    from .train import train

    train(load_config(args.config))
    return 0


def _cmd_fuse(args) -> int:
    from .fuse import fuse

    fuse(load_config(args.config), checkpoint=args.checkpoint, out_dir=args.out)
    return 0


def _cmd_convert(args) -> int:
    from .gguf import convert
    from .modelcard import refresh_card

    cfg = load_config(args.config)
    convert(cfg)
    refresh_card(cfg)  # the card states the figures convert's gate just recorded
    return 0


def _cmd_imatrix(args) -> int:
    from .gguf import imatrix

    imatrix(load_config(args.config))
    return 0


def _cmd_quantize(args) -> int:
    from .gguf import quantize
    from .modelcard import refresh_card

    cfg = load_config(args.config)
    quantize(cfg, args.type)
    refresh_card(cfg)
    return 0


def _cmd_modelfile(args) -> int:
    from .ollama import write_modelfile

    write_modelfile(load_config(args.config))
    return 0


def _cmd_register(args) -> int:
    from .ollama import register

    register(load_config(args.config))
    return 0


def _cmd_ask(args) -> int:
    from .ollama import ask

    print(ask(load_config(args.config), args.prompt))
    return 0


def _cmd_ollama_status(args) -> int:
    from .ollama import how_to_get_ollama, unavailable_reason

    cfg = load_config(args.config)
    reason = unavailable_reason()
    if reason:
        print(how_to_get_ollama(reason, cfg))
        return EXIT_NO_OLLAMA
    return 0


def _cmd_monitor(args) -> int:
    from .monitor import monitor

    monitor(load_config(args.config), once=args.once, interval=args.interval, print_every=args.print_every)
    return 0


def _cmd_plots(args) -> int:
    from .plots import plots

    plots(load_config(args.config))
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate
    from .hf import quiet_transformers
    from .modelcard import refresh_card

    quiet_transformers()
    cfg = load_config(args.config)
    try:
        evaluate(cfg)
    finally:
        refresh_card(cfg)  # a failed bound's figures are written, and stated, too
    return 0


def _cmd_model_card(args) -> int:
    from .modelcard import refresh_card

    cfg = load_config(args.config)
    if refresh_card(cfg) is None:
        raise PipelineError(f"{cfg.fused_dir}: no fused model to write a model card for; run `make fuse`")
    return 0


def _cmd_chat(args) -> int:
    from .chat import chat
    from .hf import quiet_transformers

    quiet_transformers()
    chat(args.checkpoint, prompt=args.prompt, system=args.system,
         max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def _cmd_import_soul(args) -> int:
    from .errors import BadInputError
    from .soul import import_seed_soul

    try:
        state = import_seed_soul(args.soul_pt, args.out, hidden_size=args.hidden_size)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    print(f"[import-soul] wrote {args.out}: alpha {state.alpha:+.4f}, {state.rotation.shape[0]} blocks")
    return 0


def _cmd_tiny_model(args) -> int:
    from .errors import BadInputError
    from .hf import quiet_transformers
    from .tiny import build_tiny

    quiet_transformers()
    try:
        out = build_tiny(args.out, args.family, hidden_size=args.hidden_size, tie_word_embeddings=args.tied,
                         seed=args.seed)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    print(f"[tiny-model] wrote {out} ({args.family})")
    return 0


def _cmd_demo_config(args) -> int:
    from .demo import demo_config

    out = demo_config(args.demo, args.family, args.tiny, args.out)
    print(f"[demo-config] wrote {out}")
    return 0


def _cmd_serve(args) -> int:
    from .serve import serve

    serve(load_config(args.config), host=args.host, port=args.port, backend=args.backend,
          backend_model=args.backend_model)
    return 0


def _cmd_audit_verify(args) -> int:
    from .audit import verify

    path = args.log if args.log is not None else load_config(args.config).audit_log
    print(f"{path}: OK ({verify(path)} entries)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help_: str, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if config:
            sp.add_argument("--config", type=Path, required=True, help="run config (YAML), e.g. config.yaml")
        sp.set_defaults(func=func)
        return sp

    command("check-config", _cmd_check, "Validate a config and report every problem at once.")
    sp = command("locked", _cmd_locked,
                 "Run a command (make) holding the run folder's lock: one build per run folder at a time.")
    sp.add_argument("--no-wait", action="store_true", help="refuse (exit 4) instead of waiting for the lock")
    sp.add_argument("command_line", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    command("plan", _cmd_plan, "Write the run's config stamps and plan.mk for Make; print plan.mk's path.")
    command("data", _cmd_data,
            "Prepare the training data (sources, PII policy, duplicates, split): data/ and reports/data.md.")
    command("train", _cmd_train,
            "Train LoRA + soul; write checkpoints/step_NNNNNN/ and checkpoints/final/ and metrics.jsonl.")
    sp = command("fuse", _cmd_fuse, "Merge LoRA into the 16-bit base and fold the soul into the LM head.")
    sp.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the run's checkpoints/final)")
    sp.add_argument("--out", type=Path, help="output folder (default: the run's fused/)")
    command("convert", _cmd_convert, "Convert the fused model to GGUF (gguf.outtype) with the pinned llama.cpp.")
    command("imatrix", _cmd_imatrix, "Compute the importance matrix (gguf.imatrix) of the converted GGUF.")
    sp = command("quantize", _cmd_quantize, "Quantize the converted GGUF with llama-quantize.")
    sp.add_argument("--type", required=True, help="one of gguf.quantizations, e.g. Q4_K_M")
    command("model-card", _cmd_model_card,
            "Write the model card fused/README.md from the run's reports (when they changed it).")
    command("modelfile", _cmd_modelfile, "Render the Ollama Modelfile for the run.")
    command("register", _cmd_register,
            "Register the model through Ollama's REST API at OLLAMA_HOST, prove it answers and stops, write ollama.json.")
    sp = command("ask", _cmd_ask, "Send one chat message to the registered Ollama model and print the answer.")
    sp.add_argument("--prompt", required=True)
    command("ollama-status", _cmd_ollama_status,
            "Exit 0 when Ollama is reachable; else say how to get one and exit 3.")
    sp = command("monitor", _cmd_monitor,
                 "Show a training run's progress from metrics.jsonl until training ends (or once).")
    sp.add_argument("--once", action="store_true", help="show the status once and exit")
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between looks at metrics.jsonl")
    sp.add_argument("--print-every", type=float, default=10.0,
                    help="without a terminal: seconds between printed status blocks")
    command("plots", _cmd_plots, "Plot alpha/gate with the phases, loss and orthogonality error into reports/.")
    command("eval", _cmd_eval,
            "Perplexity on held-out text for base, trained, fused and GGUF models; check eval.max_ppl_ratio.")
    sp = command("serve", _cmd_serve,
                 "Serve POST /think (only the model's <final> answer) and the dashboard; see README 'Serving'.")
    sp.add_argument("--host", help="listen address (default serve.host, 127.0.0.1); others need AGIASI_SERVE_TOKEN")
    sp.add_argument("--port", type=int, help="listen port (default serve.port, 8642)")
    sp.add_argument("--backend", help="OpenAI-compatible /v1 base URL (default: Ollama at OLLAMA_HOST)")
    sp.add_argument("--backend-model", help="model name sent to the backend (default: ollama.model)")
    sp = command("audit", lambda args: args.audit_func(args), "The /think audit log.", config=False)
    audit_sub = sp.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    sp = audit_sub.add_parser("verify", help="check that the audit log is well-formed (hashes only, exact fields)")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", type=Path, help="run config: checks <run>/audit/think.jsonl")
    which.add_argument("--log", type=Path, help="an audit log file")
    sp.set_defaults(audit_func=_cmd_audit_verify)
    sp = command("chat", _cmd_chat, "Talk to a training checkpoint (base + LoRA + soul, as trained).", config=False)
    sp.add_argument("--checkpoint", type=Path, required=True, help="e.g. build/demo/checkpoints/final")
    sp.add_argument("--prompt", help="answer this one message and exit (default: read messages from stdin)")
    sp.add_argument("--system", help="system prompt")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    sp = command("import-soul", _cmd_import_soul,
                 "Convert the seeds' soul.pt ({alpha, so8_rotation}) to soul.safetensors, loading no pickled code.",
                 config=False)
    sp.add_argument("soul_pt", type=Path)
    sp.add_argument("--out", type=Path, required=True, help="soul.safetensors to write")
    sp.add_argument("--hidden-size", type=int, help="model hidden size (needed for one shared 8x8 rotation)")
    sp = command("tiny-model", _cmd_tiny_model,
                 "Build a tiny offline base model of a family, on its real tokenizer (default: the Phi-3 demo base).",
                 config=False)
    sp.add_argument("--out", type=Path, required=True, help="output folder")
    sp.add_argument("--family", choices=TINY_FAMILIES, default="phi3")
    sp.add_argument("--hidden-size", type=int, help="default: the family's (256)")
    sp.add_argument("--tied", action=argparse.BooleanOptionalAction,
                    help="tie the LM head to the input embeddings, or --no-tied (default: as the real model: "
                         "untied for phi3, tied for the others)")
    sp.add_argument("--seed", type=int, default=0)
    sp = command("demo-config", _cmd_demo_config, "Write demo.yaml for another family's tiny model.", config=False)
    sp.add_argument("--family", required=True, choices=TINY_FAMILIES)
    sp.add_argument("--tiny", type=Path, required=True, help="the family's tiny model folder")
    sp.add_argument("--out", type=Path, required=True, help="the config to write")
    sp.add_argument("--demo", type=Path, default=Path("demo.yaml"), help="the demo config it derives from")
    return p


def quiet_libraries() -> None:
    """Keep stage output to what the stage says: no per-file progress bars or
    deprecation notices from the libraries underneath."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return args.func(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
