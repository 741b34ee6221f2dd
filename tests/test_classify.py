"""Tests of the sequence classifier (``gradclip classify``): pipeline, model, trainer."""
from __future__ import annotations

import gzip
import io
import json
import pathlib
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradclip_jax.training import cli, flags
from gradclip_jax.training.errors import UsageError
from gradclip_jax.training.classify import configs
from gradclip_jax.training.classify import input_pipeline as ip
from gradclip_jax.training.classify import models

from conftest import mr_resume_argv  # pylint: disable=C0411

# -----------------------------------------------------------------------------------------
# Synthetic data sets.
# -----------------------------------------------------------------------------------------


def _write_mr(root: pathlib.Path, n: int = 40, gz: bool = False) -> pathlib.Path:
  """MR-like files: line i of each polarity holds a word unique to it (``u<pol><i>``)."""
  root.mkdir(parents=True, exist_ok=True)
  for pol, adj in (("pos", "great"), ("neg", "awful")):
    lines = [f"a {adj} café film , u{pol}{i} !" for i in range(n)]
    data = ("\n".join(lines) + "\n").encode("latin-1")
    name = f"rt-polarity.{pol}"
    if gz:
      (root / (name + ".gz")).write_bytes(gzip.compress(data))
    else:
      (root / name).write_bytes(data)
  return root


_IMDB_TEXT = {
    "pos": "A wonderful movie.<br /><br />I loved it, truly {i}!",
    "neg": "A terrible movie.<br />I hated it... {i}",
}


def _imdb_files(n: int = 3) -> dict[str, str]:
  files = {"aclImdb/README": "readme", "aclImdb/imdb.vocab": "the\n"}
  for split in ("train", "test"):
    for label in ("pos", "neg"):
      for i in range(n):
        rating = 9 if label == "pos" else 2
        files[f"aclImdb/{split}/{label}/{i}_{rating}.txt"] = _IMDB_TEXT[label].format(
            i=f"{split}{i}")
  return files


def _write_imdb_folder(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
  return root


def _write_imdb_tar(path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w:gz") as tf:
    for name, text in sorted(files.items()):
      data = text.encode("utf-8")
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return path


# -----------------------------------------------------------------------------------------
# Tokenizer, vocabulary, splits.
# -----------------------------------------------------------------------------------------


def test_tokenize_lowercases_strips_breaks_and_splits_punctuation():
  assert ip.tokenize("Great FILM!<br /><br />Don't miss it...") == [
      "great", "film", "!", "don't", "miss", "it", ".", ".", "."]
  assert ip.tokenize("a<br/>b<BR>c") == ["a", "b", "c"]


def test_build_vocab_order_min_count_and_size():
  counts = {"b": 3, "a": 3, "c": 1, "d": 5}
  vocab = ip.build_vocab(counts, max_size=None, min_count=2)
  assert vocab.words == ("<pad>", "<unk>", "d", "a", "b")  # count desc, ties alphabetical
  assert ip.build_vocab(counts, max_size=4).words == ("<pad>", "<unk>", "d", "a")
  assert vocab.id("c") == ip.UNK_ID and vocab.id("zzz") == ip.UNK_ID
  np.testing.assert_array_equal(vocab.encode(["d", "nope"]), [2, ip.UNK_ID])


def test_vocab_from_train_split_only_and_oov_is_unk(tmp_path):
  root = _write_mr(tmp_path / "mr")
  data = ip.load_dataset("mr", root, vocab_size=None, max_len=20, valid_fraction=0.2)
  corpus = ip.load_corpus("mr", root)
  train, valid, test = ip.split_indices(corpus, "mr", valid_fraction=0.2, split_seed=0)
  assert len(train) + len(valid) + len(test) == 80 and len(test) == 8
  assert not set(train) & set(test) and not set(train) & set(valid)
  train_words = {w for i in train for w in corpus.words[corpus.ids[
      corpus.offsets[i]:corpus.offsets[i + 1]]]}
  assert set(data.vocab.words[2:]) == train_words
  assert "café" in data.vocab  # Latin-1 decoded.
  # Each test/valid line's unique word was never seen in train: it must be <unk>.
  for split in (data.valid, data.test):
    unique_pos = split.tokens[np.arange(len(split)), split.lengths - 2]
    assert np.all(unique_pos == ip.UNK_ID)
  train_unique = data.train.tokens[np.arange(len(data.train)), data.train.lengths - 2]
  assert np.all(train_unique != ip.UNK_ID)


def test_mr_split_is_seeded_and_folds_partition(tmp_path):
  corpus = ip.load_corpus("mr", _write_mr(tmp_path / "mr", gz=True))
  tests = [ip.split_indices(corpus, "mr", valid_fraction=0.1, split_seed=3, mr_fold=k)[2]
           for k in range(ip.MR_NUM_FOLDS)]
  assert sorted(np.concatenate(tests).tolist()) == list(range(len(corpus)))
  again = ip.split_indices(corpus, "mr", valid_fraction=0.1, split_seed=3, mr_fold=0)
  np.testing.assert_array_equal(again[2], tests[0])
  other = ip.split_indices(corpus, "mr", valid_fraction=0.1, split_seed=4, mr_fold=0)
  assert not np.array_equal(other[2], tests[0])


def test_truncation_keeps_end_or_start(tmp_path):
  root = _write_mr(tmp_path / "mr", n=10)
  pre = ip.load_dataset("mr", root, vocab_size=None, max_len=3, truncate="pre",
                        valid_fraction=0.0)
  post = ip.load_dataset("mr", root, vocab_size=None, max_len=3, truncate="post",
                         valid_fraction=0.0)
  assert np.all(pre.train.lengths == 3)
  assert pre.vocab.decode(pre.train.tokens[0])[-1] == "!"
  assert post.vocab.decode(post.train.tokens[0])[0] == "a"


# -----------------------------------------------------------------------------------------
# Readers: tarball vs folder, cache, errors.
# -----------------------------------------------------------------------------------------


def test_imdb_tarball_and_folder_agree_and_cache(tmp_path):
  files = _imdb_files()
  tar = _write_imdb_tar(tmp_path / "tar" / "aclImdb_v1_labeled.tar.gz", files)
  folder = _write_imdb_folder(tmp_path / "dir", files)
  a = ip.load_corpus("imdb", tar.parent)
  b = ip.load_corpus("imdb", folder)  # finds dir/aclImdb
  c = ip.load_corpus("imdb", folder / "aclImdb")
  cache = tmp_path / "cache"
  d = ip.load_corpus("imdb", tar, cache_dir=cache)
  assert len(list(cache.glob("*.npz"))) == 1
  e = ip.load_corpus("imdb", tar, cache_dir=cache)  # from the cache
  for other in (b, c, d, e):
    np.testing.assert_array_equal(a.words, other.words)
    np.testing.assert_array_equal(a.ids, other.ids)
    np.testing.assert_array_equal(a.labels, other.labels)
    np.testing.assert_array_equal(a.is_test, other.is_test)
  assert a.is_test.sum() == 6 and a.labels.sum() == 6
  assert "<" not in a.words.tolist() and "br" not in a.words.tolist()


def test_missing_data_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ip.load_corpus("imdb", tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="no IMDB data"):
    ip.load_corpus("imdb", tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ip.load_corpus("mr", tmp_path / "nope")
  (tmp_path / "rt-polarity.pos").write_text("good\n")
  with pytest.raises(FileNotFoundError, match=r"rt-polarity\.neg"):
    ip.load_corpus("mr", tmp_path)
  with pytest.raises(ValueError, match="unknown dataset"):
    ip.load_corpus("sst", tmp_path)


def test_malformed_data_errors(tmp_path):
  bad_tar = tmp_path / "garbage" / "aclImdb_v1_labeled.tar.gz"
  bad_tar.parent.mkdir()
  bad_tar.write_bytes(b"this is not a tarball")
  with pytest.raises(ip.DataError, match="not a readable IMDB tar"):
    ip.load_corpus("imdb", bad_tar.parent)
  partial = {k: v for k, v in _imdb_files().items() if "/test/" not in k}
  with pytest.raises(ip.DataError, match="test/pos"):
    ip.load_corpus("imdb", _write_imdb_tar(tmp_path / "partial" / "a.tar.gz", partial))
  mr = _write_mr(tmp_path / "mr")
  (mr / "rt-polarity.neg").write_bytes(b"\x00\x01binary")
  with pytest.raises(ip.DataError, match="binary"):
    ip.load_corpus("mr", mr)
  (mr / "rt-polarity.neg").write_bytes(b"\n  \n")
  with pytest.raises(ip.DataError, match="no sentences"):
    ip.load_corpus("mr", mr)


# -----------------------------------------------------------------------------------------
# Batching.
# -----------------------------------------------------------------------------------------


def test_padding_mask_and_batch_width():
  split = ip.Split(tokens=np.array([[5, 6, 7, 0], [8, 0, 0, 0], [9, 9, 0, 0]], np.int32),
                   lengths=np.array([3, 1, 2], np.int32), labels=np.array([1, 0, 1]))
  batch = ip.make_batch(split, np.array([1, 2]), pad_multiple=2)
  assert batch["tokens"].shape == (2, 2)
  np.testing.assert_array_equal(batch["mask"], [[True, False], [True, True]])
  full = ip.make_batch(split, np.array([0, 1]), pad_multiple=3, batch_size=4)
  assert full["tokens"].shape == (4, 3)  # Longest is 3; short batch filled to 4.
  np.testing.assert_array_equal(full["weights"], [1, 1, 0, 0])
  np.testing.assert_array_equal(full["mask"][1], [True, False, False])
  assert ip.make_batch(split, np.array([0]), pad_multiple=8)["tokens"].shape == (1, 4)
  assert np.all(full["tokens"][~full["mask"]] == ip.PAD_ID)


def test_bucketing_is_seeded_complete_and_reduces_padding():
  lengths = np.random.default_rng(0).integers(1, 400, size=1000)
  a = ip.bucketed_batches(lengths, 32, seed=1, epoch=0, chunk_batches=10)
  b = ip.bucketed_batches(lengths, 32, seed=1, epoch=0, chunk_batches=10)
  c = ip.bucketed_batches(lengths, 32, seed=1, epoch=1, chunk_batches=10)
  assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 1000 // 32
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  full = ip.bucketed_batches(lengths, 32, seed=1, epoch=0, drop_remainder=False)
  assert sorted(np.concatenate(full).tolist()) == list(range(1000))
  pad = lambda batches: sum(lengths[i].max() * len(i) - lengths[i].sum() for i in batches)
  random_batches = np.array_split(np.random.default_rng(1).permutation(1000), 1000 // 32)
  assert pad(a) < 0.2 * pad(random_batches)


# -----------------------------------------------------------------------------------------
# Model.
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
def test_final_state_is_taken_at_the_true_last_token(bidirectional):
  layer = models.LSTMLayer(hidden_size=5, bidirectional=bidirectional)
  rng = np.random.default_rng(0)
  lengths = np.array([7, 3, 1, 5])
  x = jnp.asarray(rng.normal(size=(4, 8, 6)), jnp.float32)  # Padding holds noise too.
  mask = jnp.arange(8)[None] < lengths[:, None]
  params = jax.jit(layer.init)(jax.random.key(0), x, mask)
  apply = jax.jit(layer.apply)  # One compile per shape instead of op-by-op dispatch.
  outputs, final = apply(params, x, mask)
  for b, n in enumerate(lengths):
    ref_out, ref_final = apply(params, x[b:b + 1, :n], jnp.ones((1, n), bool))
    np.testing.assert_allclose(final[b], ref_final[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[b, :n], ref_out[0], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(outputs[b, n:]) == 0)
  if not bidirectional:  # The forward final state is the output at the last real token.
    np.testing.assert_allclose(final, outputs[np.arange(4), lengths - 1], rtol=1e-6)


def test_classifier_logits_do_not_depend_on_padding():
  model = models.LSTMClassifier(vocab_size=50, embed_dim=8, hidden_size=8,
                                pooling=("last", "max", "mean"), dropout=0.3)
  tokens = jnp.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
  mask = tokens > 0
  params = jax.jit(model.init)(jax.random.key(0), tokens, mask)
  apply = jax.jit(model.apply)
  logits = apply(params, tokens, mask)
  noisy = tokens.at[0, 3:].set(42)  # Garbage in the padding, same mask.
  np.testing.assert_allclose(apply(params, noisy, mask), logits, rtol=1e-6)
  wide = jnp.pad(tokens, ((0, 0), (0, 4)))
  np.testing.assert_allclose(apply(params, wide, wide > 0), logits, rtol=1e-5, atol=1e-6)
  assert logits.shape == (2, 2)


# -----------------------------------------------------------------------------------------
# Trainer (real data).
# -----------------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
  return cli.main(["classify", "--no-progress", *argv])


def test_config_overrides():
  cfg = flags.override(configs.get_config("mr"), ["hidden_size=7", "pooling=max,mean",
                                                   "vocab_size=none", "bidirectional=0",
                                                   "learning_rate=3e-3"])
  assert (cfg.hidden_size, cfg.pooling, cfg.vocab_size, cfg.bidirectional,
          cfg.learning_rate) == (7, ("max", "mean"), None, False, 3e-3)
  with pytest.raises(UsageError, match="FIELD=VALUE"):
    flags.override(cfg, ["hidden_size"])
  with pytest.raises(UsageError, match="no config field 'hiden_size' .did you mean "
                     "hidden_size"):
    flags.override(cfg, ["hiden_size=3"])
  with pytest.raises(UsageError, match="hidden_size=x"):
    flags.override(cfg, ["hidden_size=x"])


def test_ema_update_matches_numpy_and_warms_up():
  from gradclip_jax.training.classify import train
  rng = np.random.default_rng(0)
  ema, params = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  for step, decay in ((0, 0.999), (5, 0.999), (10_000, 0.99)):
    d = min(decay, (1 + step) / (10 + step))
    got = train.ema_update({"w": jnp.asarray(ema, jnp.float32)},
                           {"w": jnp.asarray(params, jnp.float32)}, jnp.int32(step), decay)
    np.testing.assert_allclose(got["w"], d * ema + (1 - d) * params, rtol=1e-5, atol=1e-6)
  got = train.ema_update({"w": jnp.zeros(2, jnp.bfloat16)}, {"w": jnp.ones(2, jnp.bfloat16)},
                         jnp.int32(0), 0.99)
  assert got["w"].dtype == jnp.bfloat16


def test_bad_ema_decay_is_a_clear_error(shared_data_dir, tmp_path, cache_dir, capsys):
  assert _run(["--dataset", "mr", "--config", "smoke", "--data-dir",
               str(shared_data_dir / "rt-polarity"), "--cache-dir", str(cache_dir),
               "--workdir", str(tmp_path / "w"), "--set", "ema_decay=1.0",
               "--max-steps", "1"]) == 2
  assert "ema_decay must be in [0, 1)" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_cli_reports_missing_data(tmp_path, capsys):
  assert _run(["--dataset", "mr", "--data-dir", str(tmp_path / "missing"),
               "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  assert "does not exist" in err and "gradclip data fetch mr" in err


@pytest.mark.parametrize("dataset,folder", [("mr", "rt-polarity"), ("imdb", "imdb")])
def test_smoke_loss_falls_on_real_data(shared_data_dir, tmp_path, cache_dir, dataset,
                                       folder):
  workdir = tmp_path / dataset
  rc = _run(["--dataset", dataset, "--config", "smoke", "--data-dir",
             str(shared_data_dir / folder), "--workdir", str(workdir), "--cache-dir",
             str(cache_dir), "--max-epochs", "4", "--set", "max_examples=256",
             "--clip", "global_norm", "--clip-value", "0.5"]
            + ["--num-devices", "1" if dataset == "mr" else "2"])  # imdb: data-parallel path
  assert rc == 0
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2, 3, 4]
  for key in ("train_loss", "train_acc", "eval_acc", "grad_norm_mean", "clip_fraction",
              "examples_per_s"):
    assert all(np.isfinite(r[key]) for r in records), key
  assert records[-1]["train_loss"] < 0.9 * records[0]["train_loss"]
  assert 0 <= records[0]["clip_fraction"] <= 1
  result = json.loads((workdir / "results.json").read_text())
  assert 0 <= result["test_acc"] <= 1 and result["selected_epoch"] >= 1


def test_resume_gives_identical_metrics(shared_data_dir, tmp_path, cache_dir, mr_reference):
  """Stopped by --max-steps inside epoch 2, then resumed: the records and the test
  accuracy of conftest's uninterrupted run of the same flags (``MR_RESUME_FLAGS``)."""
  split = tmp_path / "split"
  argv = lambda *extra: mr_resume_argv(shared_data_dir, cache_dir, split, *extra)
  # 64 examples / batch 16 = 4 steps per epoch: stop inside epoch 2, then resume.
  assert cli.main(argv("--max-steps", "6")) == 0
  partial = (split / "metrics.jsonl").read_text().splitlines()
  assert len(partial) == 2 and json.loads(partial[1])["partial"] is True
  assert cli.main(argv("--resume")) == 0
  read = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  straight, resumed = read(mr_reference), read(split)
  assert len(straight) == len(resumed) == 2
  for a, b in zip(straight, resumed):
    a.pop("examples_per_s"), b.pop("examples_per_s")
    assert a == pytest.approx(b, rel=1e-6)
  assert straight[0]["clip_fraction"] > 0  # The rule was active.
  res = lambda d: json.loads((d / "results.json").read_text())["test_acc"]
  assert res(mr_reference) == res(split)


def test_evaluate_returns_probabilities_in_the_split_order():
  """Batches go by length; the probabilities must still land on their own examples."""
  from gradclip_jax.training.classify import train
  n = 11
  lengths = np.array([5, 1, 3, 5, 2, 4, 1, 2, 3, 5, 4], np.int32)
  tokens = np.zeros((n, 5), np.int32)
  tokens[:, 0] = np.arange(n)  # Example i starts with token i.
  split = ip.Split(tokens, lengths, (np.arange(n) % 2).astype(np.int32))
  cfg = configs.ClassifyConfig(eval_batch_size=4, pad_multiple=1)

  def eval_step(params, batch):  # p(class 1) = first token / n: a stamp of the example.
    p1 = jnp.asarray(batch["tokens"][:, 0], jnp.float32) / n
    sums = (jnp.zeros(()), jnp.sum((p1 > 0.5) == batch["labels"]) * 1.0,
            jnp.sum(batch["weights"]))
    return sums, jnp.stack([1 - p1, p1], -1)

  out = train.evaluate(eval_step, None, split, cfg, mesh=None)
  np.testing.assert_allclose(out["probs"][:, 1], np.arange(n) / n, rtol=1e-6)
  assert out["probs"].shape == (n, 2)


def test_ensemble_averages_its_members(shared_data_dir, tmp_path, cache_dir):
  workdir = tmp_path / "ens"
  rc = _run(["--dataset", "mr", "--config", "smoke", "--data-dir",
             str(shared_data_dir / "rt-polarity"), "--cache-dir", str(cache_dir),
             "--workdir", str(workdir), "--max-epochs", "1", "--num-devices", "1",
             "--set", "max_examples=64", "--set", "ensemble=2", "--seed", "3"])
  assert rc == 0
  result = json.loads((workdir / "results.json").read_text())
  assert result["ensemble"] == 2
  probs, labels = [], None
  for k, seed in enumerate((3, 4)):
    member = json.loads((workdir / f"member-{k}" / "results.json").read_text())
    assert member["seed"] == seed and member["test_acc"] == result["member_test_acc"][k]
    pred = np.load(workdir / f"member-{k}" / "predictions.npz")
    labels = pred["test_labels"]
    # The saved probabilities are the member's own: they give its test accuracy.
    assert np.mean(pred["test_probs"].argmax(-1) == labels) == pytest.approx(member["test_acc"])
    probs.append(pred["test_probs"])
  assert not np.allclose(probs[0], probs[1])  # Two different models.
  mean = (probs[0] + probs[1]) / 2
  assert result["test_acc"] == pytest.approx(np.mean(mean.argmax(-1) == labels))
  assert result["test_loss"] == pytest.approx(
      -np.mean(np.log(mean[np.arange(len(labels)), labels])), rel=1e-5)


def test_ensemble_bad_size_and_dp_are_clear_errors(shared_data_dir, tmp_path, cache_dir,
                                                   capsys):
  base = ["--dataset", "mr", "--config", "smoke", "--data-dir",
          str(shared_data_dir / "rt-polarity"), "--cache-dir", str(cache_dir),
          "--workdir", str(tmp_path / "w"), "--max-steps", "1"]
  assert _run(base + ["--set", "ensemble=0"]) == 2
  assert "ensemble must be an integer >= 1" in capsys.readouterr().err
  assert _run(base + ["--set", "ensemble=2", "--dp", "--noise-multiplier", "1.0"]) == 2
  assert "privacy" in capsys.readouterr().err


def test_mr_reads_one_snippet_per_line(tmp_path, shared_data_dir):
  """Byte 0x85 (cp1252's ellipsis, U+0085 in Latin-1) inside a snippet does not split it.

  The data README counts 5,331 lines per polarity; str.splitlines() found 5,341 / 5,337.
  """
  _write_mr(tmp_path / "mr", n=3)
  (tmp_path / "mr" / "rt-polarity.pos").write_bytes(b"so \x85 good\r\nfine\n")
  corpus = ip.read_mr(tmp_path / "mr")
  assert len(corpus) == 2 + 3  # "so \x85 good" and "fine", and three neg lines
  real = ip.read_mr(shared_data_dir / "rt-polarity")
  labels = np.asarray(real.labels)
  assert len(labels) == 2 * 5331, len(labels)
  assert (labels == labels[0]).sum() == 5331
