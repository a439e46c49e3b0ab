"""bnjax experiments: what batch normalization does, measured.

Run from the repository root: ``python -m experiments <name> [--quick] [--workdir DIR] [--resume]
[--config.key=value ...]``. ``python -m experiments list`` shows the experiments. Nothing in ``bnjax``
imports this package; it is not part of the installed wheel.

Their infrastructure: ``experiments.data`` (small datasets, batches as a pure function of the step),
``experiments.checkpoint`` (a whole ``bnjax.training.TrainState`` saved and restored with Orbax) and
``experiments.launch`` (``python -m experiments.launch``: N local processes under ``jax.distributed``).
"""
