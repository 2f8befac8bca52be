"""The command line: `albert-kernels {info,build,verify,bench,pretrain}` (also `python -m albert_kernels`)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _info(args) -> int:
    from .tools.info import report
    print(report())
    return 0


def _build(args) -> int:
    from .backends.extension.build import build
    path = build(with_cuda=args.cuda, cuda_arch=args.cuda_arch, verbose=args.verbose)
    print(f"built: {path}")
    return 0


def _verify(args) -> int:
    from .tools.verify import main as verify_main
    return verify_main(args)


def _bench(args) -> int:
    from .tools.bench import main as bench_main
    return bench_main(args)


def _pretrain(args) -> int:
    from .training.pretrain import main as pretrain_main
    return pretrain_main(args)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where the help already says it (a default
    that depends on the machine) and for on/off flags (off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def backend_name(text: str) -> str:
    """argparse type of a --backend value: a registered backend's name."""
    from .backends import backend_names
    known = sorted(backend_names())
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}, known: {', '.join(known)}")
    return text


def _subparser(sub, name: str, text: str, description: Optional[str] = None):
    return sub.add_parser(name, help=text, description=description or text[0].upper() + text[1:],
                          formatter_class=HelpFormatter)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="albert-kernels", description=__doc__,
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _subparser(sub, "info", "versions, devices, and which backends are available and why not"
               ).set_defaults(func=_info)

    b = _subparser(sub, "build", "compile the extension now instead of at first use")
    b.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                   help="include the CUDA sources (default: when a CUDA device is present)")
    b.add_argument("--cuda-arch", default=None, help='e.g. "8.0;9.0" (default: 8.0;9.0)')
    b.add_argument("--verbose", action="store_true", help="print the compiler's commands")
    b.set_defaults(func=_build)

    v = _subparser(sub, "verify", "every op and the model, every backend and dtype, against "
                   "the reference under the error budget; exit 1 on failure")
    v.add_argument("--backend", action="append", type=backend_name,
                   help="only this backend (repeatable; default: every available one but the "
                   "reference)")
    v.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                   help="only this dtype (repeatable; default: all three)")
    v.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    v.add_argument("--quick", action="store_true", help="small shapes only")
    v.add_argument("--no-model", action="store_true", help="skip the model checks")
    v.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    v.add_argument("--jsonl", metavar="FILE", help="append each result to FILE as a JSON line "
                   "as soon as it is known (a killed run keeps what it finished)")
    v.set_defaults(func=_verify)

    from .tools.bench import add_arguments
    add_arguments(_subparser(sub, "bench", "op and model benchmarks against the baselines"))
    sub.choices["bench"].set_defaults(func=_bench)

    from .training.pretrain import add_arguments as add_pretrain_arguments
    add_pretrain_arguments(_subparser(
        sub, "pretrain", "MLM + SOP pretraining of a small ALBERT on the bundled corpus"))
    sub.choices["pretrain"].set_defaults(func=_pretrain)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
