"""Trainers built on gradclip_jax (the ``gradclip`` console script, see ``cli.py``).

* ``gradclip ptb``: PTB LSTM language model (Zaremba et al. 2014), ``training/ptb/``.
* ``gradclip classify``: IMDB / MR sentence classifiers, ``training/classify/``.
* ``gradclip data fetch``: download and verify the data sets, ``fetch.py``.

Each trainer's ``train.train_and_evaluate(config, workdir)`` takes its
``configs.TrainConfig``. The pieces they share, one job per module: ``flags`` (command
line, ``--set``, :class:`~gradclip_jax.training.errors.UsageError`), ``options``
(``RunOptions``), ``clip`` (the ``--clip`` rule, gradient-norm logging), ``dp`` (DP-SGD
settings), ``steps`` (the gradient update), ``loop`` (the training loop: resume,
checkpoints, signals, evaluation, progress), ``state`` (the typed train state),
``checkpoints`` (Orbax, the workdir policy), ``metrics`` (metrics.jsonl, progress,
logging), ``mesh`` (devices, sharding, multi-host), ``interrupt`` (SIGINT / SIGTERM).

Needs the ``train`` extra (flax, orbax-checkpoint, tqdm, dp-accounting):
``pip install "gradclip_jax[train]"``.
"""
