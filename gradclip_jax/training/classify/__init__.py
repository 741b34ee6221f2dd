"""``gradclip classify``: (bi)LSTM sentiment classifier on IMDB / MR, trained with clipping.

Modules: ``input_pipeline`` (data), ``models`` (Flax), ``configs`` (named configs) and
``train`` (the loop and the CLI entry points ``add_arguments`` / ``main``). Nothing heavy is
imported here, so ``gradclip --help`` stays fast.
"""
