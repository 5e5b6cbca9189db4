"""`sam-blocked run`: run a Python script or module, unchanged, with blocked attention switched on.

As `python -m cProfile` and `coverage run` do: the script runs in this interpreter as
`__main__`, with sys.argv = [SCRIPT, ARGS...] and sys.path[0] its folder (with -m: the
module's file, and the current folder), after sam_blocked.enable(...). Its exit code is
the script's (sys.exit passes through), and an exception it raises prints its traceback
from the script's own frames, as python's does, and exits 1. One line on stderr at the end
says how many SAM attention layers ran blocked; stdout is the script's alone.
"""

from __future__ import annotations

import argparse
import builtins
import importlib.machinery
import importlib.util
import io
import os
import runpy
import sys
import types
import zipfile

from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.attention.dispatch import BACKEND_CHOICES


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="run a Python script or module unchanged, with SAM's attention computed in blocks",
        description="Runs SCRIPT (or -m MODULE) in this interpreter with sam_blocked.enable(...) on: every SAM "
        "image-encoder attention of segment_anything, segment_anything_hq, transformers and timm it builds computes "
        "in blocks; segment_anything's MaskDecoder and the automatic mask generators of segment_anything and "
        "SAM-HQ run sam_blocked.automatic's bounded steps (stock's masks to float rounding). Arguments after "
        "SCRIPT or MODULE are the script's own.",
        usage="sam-blocked run [-h] [--chunks N | --max-block-mb MB] [--backend B] (SCRIPT | -m MODULE) [ARGS ...]",
    )
    blocking = parser.add_mutually_exclusive_group()
    blocking.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, metavar="N", help="blocks per attention matrix (default %(default)s = 4 x 4)")
    blocking.add_argument("--max-block-mb", type=float, default=None, metavar="MB", help="memory budget in MiB for the largest attention block (and for a step of the mask decoder and automatic masks), instead of --chunks")
    parser.add_argument("--backend", default="auto", choices=list(BACKEND_CHOICES), metavar="B", help=f"attention kernel: {', '.join(BACKEND_CHOICES)} (default %(default)s)")
    parser.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE", help="run a library module as a script, as python -m")
    parser.add_argument("target", nargs=argparse.REMAINDER, metavar="SCRIPT [ARGS]", help="the script and its arguments")
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    from sam_blocked import switch

    if args.module:
        name, script_args = args.module[0], args.module[1:]
    elif args.target:
        name, script_args = None, args.target[1:]
    else:
        raise ValueError("give a script to run, or -m MODULE (sam-blocked run --help)")
    if name is None and not os.path.isfile(args.target[0]):
        raise ValueError(f"{args.target[0]}: no such file")
    if name is not None and _find_module(name) is None:
        raise ValueError(f"-m {name}: no module named {name}")
    switch.enable(args.chunks, args.max_block_mb, args.backend)  # a bad setting is refused before the script starts
    try:
        return _run(args.target[0] if name is None else name, script_args, module=name is not None)
    finally:
        print(f"sam-blocked run: {switch.report()}", file=sys.stderr, flush=True)


def _run(target: str, script_args: list[str], module: bool) -> int:
    """Run the script or module as __main__; its exception, if any, printed as python does (exit 1)."""
    sys.argv = [target, *script_args]
    if module:
        sys.path[0:1] = [os.getcwd()]  # python -m: the current folder first; argv[0] becomes the module's file
        runner = lambda: runpy.run_module(target, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        sys.path[0:1] = [os.path.dirname(os.path.abspath(target))]
        runner = lambda: _run_file(target)  # noqa: E731
    _unshadow("segment_anything")
    try:
        runner()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as error:
        tb = _script_frames(error.__traceback__)
        sys.excepthook(type(error), error.with_traceback(tb), tb)
        return 1
    return 0


def _run_file(path: str) -> None:
    """Execute a script file as python does: a fresh __main__ module in sys.modules, __file__ absolute,
    sys.argv[0] as given. A folder or zip with a __main__.py goes to runpy.run_path."""
    if os.path.isdir(path) or zipfile.is_zipfile(path):
        runpy.run_path(path, run_name="__main__")
        return
    full = os.path.abspath(path)
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=full, __cached__=None, __spec__=None, __package__=None, __builtins__=builtins)
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", full)
    with io.open_code(full) as f:
        code = compile(f.read(), full, "exec")
    previous = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    finally:
        if previous is not None:
            sys.modules["__main__"] = previous


def _unshadow(package: str) -> None:
    """Let the script import its own copy of `package`, as python would.

    sam_blocked imported the installed segment_anything before the script started; a
    script whose folder holds a copy of its own (MedSAM's repository ships one) would get
    the installed one from sys.modules instead. When the script's sys.path finds another
    copy first, the loaded one is dropped from sys.modules: the script imports its own, and
    the import hook patches that one's classes.
    """
    loaded = sys.modules.get(package)
    origin = getattr(getattr(loaded, "__spec__", None), "origin", None)
    if origin is None:
        return
    spec = importlib.machinery.PathFinder.find_spec(package, sys.path)
    if spec is None or spec.origin is None or os.path.samefile(spec.origin, origin):
        return
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


def _find_module(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package that is missing or not a package
        return None


def _script_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback from the script's first frame on: runpy's and this file's frames dropped."""
    skip = {__file__, runpy.__file__, "<frozen runpy>", "<string>"}
    while tb is not None and tb.tb_frame.f_code.co_filename in skip:
        tb = tb.tb_next
    return tb
