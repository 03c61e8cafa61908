"""`python -m benchmarks`: argument parsing and where the results go."""
from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from . import configs, plots, report, suite
from .baselines import VARIANTS

EPILOG = """\
examples:
  python -m benchmarks --quick                      # every metric, tiny shapes, < 1 minute
  python -m benchmarks all --config pdb-cpu         # one standard configuration, full size
  python -m benchmarks memory --sweep num_layers --plots
  python -m benchmarks all --device cuda --config pdb-gpu --config trans-gpu --config efm-gpu
"""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Saved-for-backward bytes, memory traffic and time of csp_kernels' fused "
                    "modules against eager, checkpointed and compiled references.")
    parser.add_argument("command", nargs="?", default="all", choices=suite.COMMANDS,
                        help="traffic: bytes moved (and CIO); memory: saved bytes and CUDA peak; "
                             "speed: eval and train time; all (default): everything")
    parser.add_argument("--config", action="append", dest="configs", default=[],
                        choices=sorted(configs.CONFIGS), metavar="NAME",
                        help=f"standard configuration, repeatable: {', '.join(configs.CONFIGS)} "
                             "(default: the device's three)")
    parser.add_argument("--sweep", action="append", dest="sweeps", default=[],
                        choices=sorted(configs.SWEEPS), help="sweep a partial dense block "
                        "parameter, repeatable")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and few repetitions, no compile variants")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=suite.Settings.device)
    parser.add_argument("--variants", type=lambda text: text.split(","),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, help="timed samples per variant (default 15, "
                                                   "quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls per variant (default 3)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/out/<time>)")
    parser.add_argument("--plots", action="store_true",
                        help=f"PNG plots of the sweeps; runs {', '.join(configs.PLOT_SWEEPS)} "
                             "when no --sweep is given")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    sweeps = args.sweeps or (list(configs.PLOT_SWEEPS) if args.plots else [])
    out_dir = args.out or Path(__file__).parent / "out" / datetime.datetime.now().strftime(
        "%Y%m%d-%H%M%S")
    try:
        settings = suite.Settings(command=args.command, configs=args.configs, sweeps=sweeps,
                                  quick=args.quick, device=args.device, variants=args.variants,
                                  warmup=args.warmup, rounds=args.rounds)
        report.make_out_dir(out_dir)
    except ValueError as err:
        parser.error(str(err))
    started = time.perf_counter()
    record = suite.run(settings)
    record["elapsed_s"] = time.perf_counter() - started
    paths = report.write_all(record, out_dir)
    if args.plots:
        paths.update({p.name: p for p in plots.make_plots(record, out_dir)})
    print(report.format_report(record))
    print(f"\n{record['elapsed_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
