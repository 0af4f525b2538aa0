"""Command-line flags generated from the config dataclasses, and the user-error wrapper of every script.

Precedence: defaults < ``--preset`` < ``--config run.json`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from gemma_lowmem.config import SECTIONS, RunConfig, field_type, read_config_file
from gemma_lowmem.errors import UserError

# The seed's experiment grid, plus the settings of the embedded demo (fits 15 minutes on 2 CPU cores).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "baseline": {"train": {"lr": 2e-4, "epochs": 3}, "data": {"max_train_samples": 2000}},
    "high_lr": {"train": {"lr": 5e-4, "epochs": 3}, "data": {"max_train_samples": 2000}},
    "more_data": {"train": {"lr": 2e-4, "epochs": 3}, "data": {"max_train_samples": 5000}},
    "more_epochs": {"train": {"lr": 2e-4, "epochs": 5}, "data": {"max_train_samples": 2000}},
}
DEMO: dict[str, dict[str, Any]] = {
    "model": {"model": "gemma-3-270m"},
    "data": {"demo": True, "max_seq_length": 1024, "max_val_samples": 6},
    "train": {"epochs": 1, "lr": 3e-4, "batch_size": 2, "grad_accum": 2, "eval_every": 5, "save_every": 5},
    "eval": {"evaluate": True, "max_new_tokens": 320, "report_examples": 3},
}


FLAG_PREFIXES = {"lora": "lora-", "preference": "dpo-"}  # their fields (r, alpha, beta, loss) would be ambiguous alone


def flag_name(section: str, name: str) -> str:
    return f"--{FLAG_PREFIXES.get(section, '')}{name.replace('_', '-')}"


def _parser_for(base: type, optional: bool, flag: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {base.__name__}, got {text!r}") from None

    return parse


def pair_parser(flag: str) -> Callable[[str], tuple[str, str]]:
    """The argparse ``type`` of one ``KEY=VALUE`` value of ``flag`` (``--columns article=text``)."""

    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not (sep and key.strip() and value.strip()):
            raise argparse.ArgumentTypeError(f"{flag} expects KEY=VALUE pairs such as article=text, got {text!r}")
        return key.strip(), value

    return parse


class PairsAction(argparse.Action):
    """``--columns a=b c=d`` (or the flag given twice) -> ``{"a": "b", "c": "d"}``; a key named twice is an error."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        pairs = dict(getattr(namespace, self.dest, {}))
        for key, value in values:
            if key in pairs:
                parser.error(f"{option_string} names '{key}' twice ({key}={pairs[key]}, {key}={value})")
            pairs[key] = value
        setattr(namespace, self.dest, pairs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the usage examples of a script's docstring as written (defaults are spelled in each flag's help)."""


def _split_doc(doc: str) -> tuple[str, str | None]:
    """A script docstring -> (first paragraph: the description, the rest: the epilog with its examples)."""
    head, _, rest = doc.strip().partition("\n\n")
    return head, rest.strip() or None


def _help(text: str, default: Any) -> str:
    """The flag's help with its default, unless the text already says what the default is."""
    return text if "default" in text else f"{text} (default: {default})"


def build_parser(doc: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field (help from the field's metadata).

    Args:
        doc: the script's docstring: its first paragraph describes the script, the rest (examples) ends ``--help``.
        extra: adds the script's own flags.
    """
    description, epilog = _split_doc(doc)
    parser = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON file with sections model/lora/data/train (flags "
                        "override it)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the seed's experiment grid: " + "; ".join(
        f"{k}: {v['train']['lr']:g} lr, {v['train']['epochs']} epochs, {v['data']['max_train_samples']} samples"
        for k, v in PRESETS.items()))
    for section, section_cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({section_cls.__doc__.strip().splitlines()[0]})")
        for f in fields(section_cls):
            flag = flag_name(section, f.name)
            default = f.default if f.default is not MISSING else f.default_factory()
            kw: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                                  "help": _help(f.metadata["help"], default)}
            base, optional = field_type(f.type)
            # argparse shows choices as {a,b}; other values by their kind (a number) or their name (a path, an id)
            metavar = f.metadata.get("metavar") or (f.name.upper() if base in (str, list) else base.__name__.upper())
            if base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif base is list:
                group.add_argument(flag, nargs="+", metavar=metavar, **kw)
            elif base is dict:
                group.add_argument(flag, nargs="+", type=pair_parser(flag), action=PairsAction,
                                   metavar=metavar, **kw)
            elif "choices" in f.metadata:
                group.add_argument(flag, type=_parser_for(base, optional, flag), choices=f.metadata["choices"], **kw)
            else:
                group.add_argument(flag, type=_parser_for(base, optional, flag), metavar=metavar, **kw)
    if extra is not None:
        extra(parser)
    return parser


def given_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """What the command line sets, as nested sections: --demo, then --preset, --config, then the flags given."""
    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    given = {k: v for k, v in vars(args).items() if "." in k}
    layers = [DEMO] if given.get("data.demo") else []
    if args.preset:
        layers.append(PRESETS[args.preset])
    if args.config:
        layers.append(read_config_file(args.config))
    for layer in layers:
        for section, items in layer.items():
            merged[section].update(items)
    for key, value in given.items():
        section, name = key.split(".", 1)
        merged[section][name] = value
    return merged


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Merge defaults, preset, config file and flags into a validated ``RunConfig``."""
    return RunConfig.from_dict(given_settings(args), source="command line")


def run_script(main: Callable[[], Any]) -> None:
    """Run a script's main; a ``UserError`` becomes one ``error:`` line and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def print_config(cfg: RunConfig) -> None:
    print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
