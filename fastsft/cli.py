"""The ``fastsft`` command: ``fastsft train`` and ``fastsft export``.

Errors a user can fix (bad config, bad data, missing files) print one line naming the problem and exit
with status 2; they never end in a stack trace (set FASTSFT_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import sys
import warnings
from pathlib import Path

from fastsft import config as config_mod
from fastsft.config import ConfigError
from fastsft.train.signals import RunStopped  # stdlib only: the CLI still starts without importing torch

EMBEDDED_DEFAULT = Path(__file__).parent / "recipes" / "tiny.yaml"

# Short flags for the options people set most; each is the same as its dotted key.
ALIASES = {
    "--data": ("data.datasets", "Training data file (repeat for several); same as --data.datasets."),
    "--format": ("data.format", "Record format; same as --data.format."),
    "--fields": ("data.fields", "Field mapping, e.g. prompt=question,completion=answer; same as --data.fields."),
    "--model": ("model.path", "Model directory, .gguf file or hub id; same as --model.path."),
    "--tokenizer": ("model.tokenizer", "Tokenizer directory, hub id or 'byte'; same as --model.tokenizer."),
    "--output": ("output.dir", "Output directory; same as --output.dir."),
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the option (with a did-you-mean for a misspelt one),
    like the YAML path, not the whole usage text."""

    def error(self, message: str):
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            flag = m.group(1).split("=", 1)[0]
            known = [s for a in self._actions for s in a.option_strings]
            close = difflib.get_close_matches(flag, known, n=1)
            message = f"unknown option {flag}" + (f" (did you mean {close[0]}?)" if close else "") + \
                "; fastsft train --help lists every option"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _numbers_as_values(argv: list[str]) -> list[str]:
    """``--train.lr -1e-4``: a negative number after an option is its value, not another option (argparse
    only knows this for plain integers)."""
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _train_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="fastsft train",
        description="Instruction-tune a model with LoRA (or full fine-tuning). With no arguments, trains a "
                    "tiny model on the built-in generated dataset, needing nothing from outside.",
        epilog="Values: booleans true/false; lists comma-separated (q_proj,v_proj) or YAML ([a, b]); "
               "mappings k=v,k=v or YAML. Example: fastsft train --data train.jsonl --fields "
               "prompt=question,completion=answer --model.path ./llama --train.max_steps 100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("config", nargs="?", help="YAML config file (sections model, lora, data, train, eval, output).")
    p.add_argument("--recipe", metavar="NAME",
                   help=f"A recipe shipped with fastsft instead of a config file: {', '.join(recipe_names())}. "
                        "llava-demo runs the embedded two-stage multimodal demo (images drawn locally).")
    p.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                   help="Continue from the latest checkpoint of RUN_DIR (default: output.dir), with its saved "
                        "config plus any overrides given here.")
    short = p.add_argument_group("shortcuts")
    for flag, (key, help_text) in ALIASES.items():
        short.add_argument(flag, dest=key, action="append" if key == "data.datasets" else "store",
                           metavar="VALUE", help=help_text)
    short.add_argument("--skip-bad-records", dest="data.skip_bad_records", action="store_const", const=True,
                       help="Skip malformed records (counted and reported); same as --data.skip_bad_records true.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, f in config_mod.iter_options():
        section = key.split(".")[0]
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} options")
        default = f.default if f.default_factory is config_mod.dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(choices)}." if choices else ""
        groups[section].add_argument(f"--{key}", dest=key, metavar="VALUE", default=argparse.SUPPRESS,
                                     help=f"{f.metadata['help']}{extra} (default: {default!r})")
    return p


def _overrides(ns: argparse.Namespace) -> dict:
    out = {}
    for key, value in vars(ns).items():
        if "." in key and value is not None:
            out[key] = value
    return out


RECIPES = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml") if not p.stem.startswith("llava-demo-")) + ["llava-demo"]


def _recipe_path(name: str) -> Path:
    path = RECIPES / f"{name}.yaml"
    if name == "llava-demo" or not path.is_file():
        close = difflib.get_close_matches(name, recipe_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--recipe {name}: no such recipe{hint}; recipes: {', '.join(recipe_names())}")
    return path


def train_main(argv: list[str]) -> int:
    args = _train_parser().parse_args(_numbers_as_values(argv))
    overrides = _overrides(args)
    try:
        resume = args.resume is not None
        config_path = args.config
        if args.recipe and resume:
            raise ConfigError("--resume continues with the run's saved config; drop --recipe")
        if args.recipe == "llava-demo":  # two stages, one command
            if config_path:
                raise ConfigError("give either a config file or --recipe, not both")
            from fastsft.multimodal.demo_run import run_demo

            run_demo(overrides)
            return 0
        if args.recipe:
            if config_path:
                raise ConfigError("give either a config file or --recipe, not both")
            config_path = _recipe_path(args.recipe)
        if resume:
            cfg = _resume_config(args.resume, config_path, overrides)
        else:
            if config_path is None and not {"data.datasets", "model.path", "model.config"} & set(overrides):
                config_path = EMBEDDED_DEFAULT
                print(f"fastsft train: no config or data given: the embedded default ({EMBEDDED_DEFAULT.name})",
                      file=sys.stderr)
            cfg = config_mod.load(config_path, overrides)
        from fastsft.train.loop import train

        train(cfg, resume=resume)
    except RunStopped as e:  # SIGTERM/SIGINT or non-finite losses: a checkpoint is written, say how to resume
        print(f"fastsft train: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - sorted below: a user's problem is one line, a bug a traceback
        if os.environ.get("FASTSFT_DEBUG") or not _user_error(e):
            raise
        for problem in getattr(e, "problems", None) or [_one_line(e)]:  # preflight: every problem it found
            print(f"fastsft train: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsft train: interrupted", file=sys.stderr)
        return 130
    return 0


def _user_error(e: BaseException) -> bool:
    """Errors a user can fix: config, data, model loading (ValueErrors), files and disks (OSError), and
    safetensors' own error for a file it cannot write or read."""
    if isinstance(e, (ValueError, OSError)):
        return True
    return type(e).__name__ == "SafetensorError"


def _resume_config(resume_arg: str, config_path, overrides: dict):
    """The config a --resume asks for: the run's saved config.yaml (verified) with the overrides on top, or
    a config file given on the command line; the trainer then applies or refuses each difference (and
    says when there is no run directory to resume)."""
    from fastsft.train.run_dir import load_saved_config

    if resume_arg:
        run_dir = Path(resume_arg)
    elif "output.dir" in overrides:
        run_dir = Path(overrides["output.dir"])
    else:
        run_dir = _latest_run(Path("runs"))
    overrides = {**overrides, "output.dir": str(run_dir)}
    if config_path is None and (run_dir / "config.yaml").exists():
        cfg = load_saved_config(run_dir)
        for key, value in overrides.items():
            config_mod.set_option(cfg, key, value)
        config_mod.validate(cfg)
        return cfg
    if config_path is None and not {"data.datasets", "model.path", "model.config"} & set(overrides):
        config_path = EMBEDDED_DEFAULT  # a run that never wrote its config: what a bare `fastsft train` runs
    return config_mod.load(config_path, overrides)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        text = f"{e.filename}: {e.strerror}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            from fastsft.train.files import free_space

            text += f" ({free_space(Path(e.filename))})"
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__


def _latest_run(runs: Path) -> Path:
    """The most recently started run under ``runs/`` (a directory with a config.yaml)."""
    dirs = sorted((d for d in runs.glob("*") if (d / "config.yaml").is_file()), key=lambda d: d.stat().st_mtime)
    if not dirs:
        raise ConfigError(f"--resume: no run under {runs}/; pass the run directory")
    return dirs[-1]


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """fastsft's own warnings (a kernel falling back, with its cause and cost) are sentences for the user:
    printed as they are, without the file, line and source line Python adds."""
    text = str(message)
    if text.startswith("fastsft"):
        return f"{text}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


USAGE = """usage: fastsft <command> [options]

commands:
  train    instruction-tune a model (LoRA, QLoRA or full); with no options, a tiny model on built-in data
  export   merge a LoRA adapter into its base model and write a transformers checkpoint

fastsft <command> --help lists a command's options; fastsft --version prints the version."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from fastsft import __version__

        print(f"fastsft {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command == "export":
        from fastsft.export import export_main

        return export_main(rest)
    close = difflib.get_close_matches(command, ["train", "export"], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    print(f"fastsft: error: unknown command {command!r}{hint}; commands: train, export (fastsft --help)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
