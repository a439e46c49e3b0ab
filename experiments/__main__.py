"""``python -m experiments <name>|list|all|report [--quick] [--workdir DIR] [--resume] [--config.k=v ...]``.

``<name> --show-config`` prints every config key with its value and help. Results (the verdict line, the
report's and figures' paths) go to stdout; logs and progress bars to stderr, and ``--quiet`` hides the bars.
"""

import argparse
import sys
import warnings

from experiments import config_parsing


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m experiments",
    description="Runs the bnjax batch-normalization experiments. Verbs: list, all, report, or an "
    f"experiment name ({', '.join(config_parsing.EXPERIMENTS)}).",
    epilog="Override any config key with --config.KEY=VALUE (nested keys with dots, e.g. "
    "--config.criterion.target_accuracy=0.9).",
  )
  parser.add_argument("verb", help="an experiment name, or list / all / report")
  parser.add_argument("--quick", action="store_true", help="the seconds-long form of the experiment")
  parser.add_argument("--workdir", default="runs", help="where runs are written (default: runs/)")
  parser.add_argument(
    "--resume", action="store_true", help="continue the latest run of this experiment from its checkpoints"
  )
  parser.add_argument(
    "--quiet",
    action="store_true",
    help="no progress bars (the verdict and the report's and figures' paths still print)",
  )
  parser.add_argument(
    "--show-config",
    action="store_true",
    help="print every config key of the experiment with its default and help, and exit",
  )
  parser.add_argument(
    "--allow-dirty", action="store_true", help="report: publish runs from a dirty tree or of unknown code version"
  )
  parser.add_argument(
    "--allow-overrides", action="store_true", help="report: publish runs made with --config overrides"
  )
  parser.add_argument(
    "--distributed",
    choices=("auto", "on", "off"),
    default="auto",
    help="train: join the multi-process job of a cluster JAX detects (SLURM, Open MPI, "
    "Kubernetes, Cloud TPU) or of python -m experiments.launch; auto: when there is one",
  )
  parser.add_argument(
    "--results_dir", default="experiments/results", help="report: the tracked folder for the results markdown and plots"
  )
  parser.add_argument(
    "--readme", default="", help="report: a README whose results section to update too (default: none)"
  )
  return parser


def _plain_warnings(fallback):
  """A `warnings.showwarning` printing the project's own warnings (a checkpoint skipped, a stale lock taken
  over) as one plain line, and passing the others to ``fallback``."""

  def show(message, category, filename, lineno, file=None, line=None):
    if category.__module__.startswith("experiments"):
      print(f"warning: {message}", file=sys.stderr, flush=True)
    else:
      fallback(message, category, filename, lineno, file, line)

  return show


def _value(value) -> str:
  return repr(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)


def config_text(name: str, *, quick: bool = False, overrides=()) -> str:
  """Every key of ``name``'s config with its default (and the value given, if overridden) and help."""
  from experiments import configs  # pylint: disable=g-import-not-at-top

  default = config_parsing.load_config(name, quick=quick)
  given = config_parsing.load_config(name, quick=quick, overrides=overrides)
  form = "quick form" if quick else "full form (--quick: the seconds-long one)"
  lines = [f"{name}, {form}; override a key with --config.KEY=VALUE:"]
  keys = config_parsing.leaf_keys(default)
  width = max(len(k) for k in keys)
  for key in keys:
    value = _value(config_parsing.config_value(default, key))
    now = _value(config_parsing.config_value(given, key))
    shown = value if now == value else f"{now} (default {value})"
    lines.append(f"  {key:{width}s} = {shown}")
    lines.append(f"  {'':{width}s}   {configs.help_text(name, key) or '(no help written yet)'}")
  return "\n".join(lines)


def _refusal(error: BaseException):
  """The exit code for an error the operator can act on (printed without a traceback), or None."""
  from experiments import runner  # pylint: disable=g-import-not-at-top

  checkpoint = sys.modules.get("experiments.checkpoint")  # Loaded only once jax may be imported.
  if isinstance(error, config_parsing.ConfigError) or str(error).startswith(("config.", "--config", "--")):
    return 2
  kinds = (runner.RunError, OSError) + ((checkpoint.CheckpointError,) if checkpoint is not None else ())
  return 1 if isinstance(error, kinds) else None


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args, rest = _parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    _parser().error(f"unrecognized arguments: {' '.join(unknown)}")
  previous = warnings.showwarning
  warnings.showwarning = _plain_warnings(previous)
  try:
    if args.verb == "list":
      from experiments import report  # pylint: disable=g-import-not-at-top

      print(report.list_text())
      return 0
    if args.verb == "report":
      from experiments import report  # pylint: disable=g-import-not-at-top

      written = report.build(
        workdir=args.workdir,
        results_dir=args.results_dir,
        readme=args.readme,
        allow_dirty=args.allow_dirty,
        allow_overrides=args.allow_overrides,
      )
      print("\n".join(str(p) for p in written))
      return 0
    from experiments import runner  # pylint: disable=g-import-not-at-top

    names = config_parsing.EXPERIMENTS if args.verb == "all" else (config_parsing.check_name(args.verb),)
    if args.show_config:
      print("\n\n".join(config_text(n, quick=args.quick, overrides=overrides) for n in names))
      return 0
    from experiments import launch  # pylint: disable=g-import-not-at-top

    with launch.job_workdir(args.distributed, args.workdir, names) as workdir:  # before jax starts
      for name in names:
        runner.run_experiment(
          name,
          quick=args.quick,
          workdir=workdir,
          resume=args.resume,
          overrides=overrides,
          quiet=args.quiet or workdir != args.workdir,
        )
    return 0
  except Exception as e:  # A refused config or argument, or a run that cannot go on: say which, no traceback.
    code = _refusal(e)
    if code is None:
      raise
    print(f"error: {e}", file=sys.stderr)
    return code
  finally:
    warnings.showwarning = previous


if __name__ == "__main__":
  sys.exit(main())
