"""``python -m experiments <name>|list|all|report [--quick] [--workdir DIR] [--resume] [--config.k=v ...]``."""
import argparse
import sys

from experiments import config_parsing


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments",
      description="Runs the bnjax batch-normalization experiments. Verbs: list, all, report, or an "
                  f"experiment name ({', '.join(config_parsing.EXPERIMENTS)}).",
      epilog="Override any config key with --config.KEY=VALUE (nested keys with dots, e.g. "
             "--config.criterion.target_accuracy=0.9).")
  parser.add_argument("verb", help="an experiment name, or list / all / report")
  parser.add_argument("--quick", action="store_true", help="the seconds-long form of the experiment")
  parser.add_argument("--workdir", default="runs", help="where runs are written (default: runs/)")
  parser.add_argument("--resume", action="store_true",
                      help="continue the latest run of this experiment from its checkpoints")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  parser.add_argument("--results_dir", default="experiments/results",
                      help="report: the tracked folder for the results markdown and plots")
  parser.add_argument("--readme", default="README.md", help="report: the README to update")
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args, rest = _parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    _parser().error(f"unrecognized arguments: {' '.join(unknown)}")
  try:
    if args.verb == "list":
      from experiments import report  # pylint: disable=g-import-not-at-top
      print(report.list_text())
      return 0
    if args.verb == "report":
      from experiments import report  # pylint: disable=g-import-not-at-top
      written = report.build(workdir=args.workdir, results_dir=args.results_dir, readme=args.readme)
      print("\n".join(str(p) for p in written))
      return 0
    from experiments import runner  # pylint: disable=g-import-not-at-top
    names = config_parsing.EXPERIMENTS if args.verb == "all" else (config_parsing.check_name(args.verb),)
    for name in names:
      runner.run_experiment(name, quick=args.quick, workdir=args.workdir,
                                      resume=args.resume, overrides=overrides, quiet=args.quiet)
    return 0
  except (ValueError, TypeError) as e:  # A refused config or argument: say which, no traceback.
    if isinstance(e, config_parsing.ConfigError) or str(e).startswith(("config.", "--config", "--")):
      print(f"error: {e}", file=sys.stderr)
      return 2
    raise


if __name__ == "__main__":
  sys.exit(main())
