"""Trainers built on gradclip_jax (the ``gradclip`` console script, see ``cli.py``).

* ``gradclip ptb``: PTB LSTM language model (Zaremba et al. 2014), ``training/ptb/``.
* ``gradclip classify``: IMDB / MR sentence classifiers, ``training/classify/``.
* ``common.py``: the pieces they share (clip-rule builder, flags, metrics.jsonl,
  orbax checkpoints, progress bar, data-parallel mesh helpers).

Needs the ``train`` extra (orbax-checkpoint, tqdm): ``pip install "gradclip_jax[train]"``.
"""
