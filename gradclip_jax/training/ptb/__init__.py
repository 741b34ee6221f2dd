"""PTB word-level LSTM language model (Zaremba, Sutskever & Vinyals 2014, "Recurrent
Neural Network Regularization"), after TensorFlow's ``ptb_word_lm.py`` tutorial, trained
with a gradient clipping rule from :mod:`gradclip_jax` (``gradclip ptb``)."""
