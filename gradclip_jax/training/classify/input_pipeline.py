"""Input pipeline for sentiment classification: IMDB and MR.

Data sets
  * IMDB (Maas et al. 2011, "Learning Word Vectors for Sentiment Analysis"): 25k train and
    25k test movie reviews, binary labels. Read from the ``aclImdb_v1*.tar.gz`` tarball or
    from an extracted ``aclImdb/`` folder.
  * MR (Pang & Lee 2005, "Seeing stars"): 5,331 positive + 5,331 negative Rotten Tomatoes
    snippets in ``rt-polarity.{pos,neg}`` (plain or ``.gz``), Latin-1 encoded. MR has no
    official test split. We use a seeded 10-fold partition (``split_seed``, default 0);
    fold ``mr_fold`` (default 0) is the test set, so the default is a fixed 90/10 split.
    Looping ``mr_fold`` over 0..9 gives the usual 10-fold cross-validation.

Pipeline
  1. Parse and tokenize every document once (lowercase, strip ``<br />``, split punctuation)
     and cache the result as ``.npz`` in ``cache_dir``. The cache stores raw word ids, so
     vocabulary size, min count and maximum length can change without re-parsing.
  2. Build the vocabulary from the *training* split only: ``<pad>`` = 0, ``<unk>`` = 1,
     then words by decreasing count (ties broken alphabetically), keeping at most
     ``vocab_size`` entries and only words seen ``min_count`` times or more. Any other word
     maps to ``<unk>``.
  3. Truncate to ``max_len`` tokens ("pre" keeps the end of a review, "post" its start) and
     store a padded ``[N, max_len]`` matrix plus the true lengths.
  4. Batch with length bucketing (:func:`bucketed_batches`). Each batch is padded only up to
     its longest member, rounded up to ``pad_multiple`` (this bounds the number of distinct
     shapes ``jit`` compiles), and carries a boolean ``mask``. DP-SGD's Poisson-sampled
     batches are padded to a fixed number of rows instead (:func:`padded_batch`).

Everything random is driven by explicit seeds, so a split or epoch order is reproducible.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

PAD = "<pad>"
UNK = "<unk>"
PAD_ID = 0
UNK_ID = 1

# Bump when tokenization or the cache layout changes: old caches are then rebuilt.
_CACHE_VERSION = 2  # 2: MR split at newlines only

_BREAK_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TOKEN_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_IMDB_MEMBER_RE = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
_IMDB_TARBALLS = ("aclImdb_v1_labeled.tar.gz", "aclImdb_v1.tar.gz", "aclImdb.tar.gz",
                  "aclImdb_v1.tar", "aclImdb.tar")

DATASETS = ("imdb", "mr")
MR_NUM_FOLDS = 10


class DataError(ValueError):
  """A data file exists but is not what the loader expects."""


# -----------------------------------------------------------------------------------------
# Tokenization and vocabulary.
# -----------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
  """Lowercases, turns HTML line breaks into spaces and splits off punctuation.

  >>> tokenize("Great film!<br /><br />Don't miss it.")
  ['great', 'film', '!', "don't", 'miss', 'it', '.']
  """
  return _TOKEN_RE.findall(_BREAK_RE.sub(" ", text.lower()))


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Word <-> id mapping; id 0 is ``<pad>`` and id 1 is ``<unk>``."""

  words: tuple[str, ...]

  def __post_init__(self):
    if self.words[:2] != (PAD, UNK):
      raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}; got {self.words[:2]}")
    object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

  def __len__(self) -> int:
    return len(self.words)

  def __contains__(self, word: str) -> bool:
    return word in self._index  # type: ignore[attr-defined]

  def id(self, word: str) -> int:
    return self._index.get(word, UNK_ID)  # type: ignore[attr-defined]

  def encode(self, tokens: Iterable[str]) -> np.ndarray:
    return np.asarray([self.id(t) for t in tokens], dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> list[str]:
    return [self.words[int(i)] for i in ids]


def build_vocab(counts: dict[str, int] | Sequence[tuple[str, int]], *,
                max_size: int | None, min_count: int = 1) -> Vocab:
  """Vocabulary from word counts (which must come from the training split only).

  Words are ordered by decreasing count, ties alphabetically, so the result does not depend
  on the order the counts were gathered in. ``max_size`` includes the two special tokens.
  """
  items = counts.items() if isinstance(counts, dict) else counts
  kept = [(w, c) for w, c in items if c >= min_count and w not in (PAD, UNK)]
  kept.sort(key=lambda wc: (-wc[1], wc[0]))
  if max_size is not None:
    if max_size < 2:
      raise ValueError(f"vocab_size must be >= 2 (room for {PAD} and {UNK}); got {max_size}")
    kept = kept[:max_size - 2]
  return Vocab((PAD, UNK) + tuple(w for w, _ in kept))


# -----------------------------------------------------------------------------------------
# A tokenized corpus: the cached, vocabulary-independent form of a data set.
# -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenizedCorpus:
  """All documents of a data set as raw word ids into ``words``.

  Document ``i`` is ``ids[offsets[i]:offsets[i + 1]]``. ``is_test`` marks the official test
  split (all False for MR, which has none).
  """

  words: np.ndarray   # [W] str, distinct tokens
  ids: np.ndarray     # [total_tokens] int32
  offsets: np.ndarray  # [N + 1] int64
  labels: np.ndarray  # [N] int32
  is_test: np.ndarray  # [N] bool

  def __len__(self) -> int:
    return len(self.labels)

  @classmethod
  def from_documents(cls, docs: Sequence[list[str]], labels: Sequence[int],
                     is_test: Sequence[bool]) -> TokenizedCorpus:
    index: dict[str, int] = {}
    flat: list[int] = []
    offsets = [0]
    for tokens in docs:
      flat.extend(index.setdefault(t, len(index)) for t in tokens)
      offsets.append(len(flat))
    words = np.array(list(index), dtype=str) if index else np.zeros((0,), dtype=str)
    return cls(words=words, ids=np.asarray(flat, dtype=np.int32),
               offsets=np.asarray(offsets, dtype=np.int64),
               labels=np.asarray(labels, dtype=np.int32),
               is_test=np.asarray(is_test, dtype=bool))

  def word_counts(self, docs: np.ndarray) -> list[tuple[str, int]]:
    """(word, count) over the documents ``docs`` only."""
    if len(docs) == 0:
      return []
    pieces = [self.ids[self.offsets[i]:self.offsets[i + 1]] for i in docs]
    counts = np.bincount(np.concatenate(pieces), minlength=len(self.words))
    nz = np.flatnonzero(counts)
    return list(zip(self.words[nz].tolist(), counts[nz].tolist()))

  def save(self, path: pathlib.Path, meta: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, words=self.words, ids=self.ids, offsets=self.offsets, labels=self.labels,
             is_test=self.is_test, meta=np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: pathlib.Path, meta: dict) -> TokenizedCorpus | None:
    """The cached corpus, or None when the cache is absent, stale or unreadable."""
    try:
      with np.load(path, allow_pickle=False) as z:
        if json.loads(str(z["meta"])) != json.loads(json.dumps(meta, sort_keys=True)):
          return None
        return cls(words=z["words"], ids=z["ids"], offsets=z["offsets"],
                   labels=z["labels"], is_test=z["is_test"])
    except (OSError, ValueError, KeyError):
      return None


# -----------------------------------------------------------------------------------------
# Readers.
# -----------------------------------------------------------------------------------------


def _file_signature(path: pathlib.Path) -> dict:
  st = path.stat()
  return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def find_imdb_source(data_dir: str | os.PathLike) -> pathlib.Path:
  """The IMDB tarball or extracted ``aclImdb`` folder under (or at) ``data_dir``."""
  p = pathlib.Path(data_dir).expanduser()
  if p.is_file():
    return p
  if not p.exists():
    raise FileNotFoundError(f"IMDB data directory {p} does not exist")
  if (p / "train").is_dir() and (p / "test").is_dir():
    return p
  if (p / "aclImdb").is_dir():
    return p / "aclImdb"
  for name in _IMDB_TARBALLS:
    if (p / name).is_file():
      return p / name
  tars = sorted(q for q in p.iterdir() if q.name.endswith((".tar.gz", ".tgz", ".tar")))
  if len(tars) == 1:
    return tars[0]
  raise FileNotFoundError(
      f"no IMDB data in {p}: expected {_IMDB_TARBALLS[0]} (or another aclImdb tarball) or an "
      "extracted aclImdb/ folder with train/{pos,neg} and test/{pos,neg}")


def _imdb_records_from_tar(path: pathlib.Path) -> Iterator[tuple[str, str, int, str]]:
  try:
    with tarfile.open(path, "r:*") as tf:
      for member in tf:
        m = _IMDB_MEMBER_RE.search(member.name)
        if m is None or not member.isfile():
          continue
        raw = tf.extractfile(member).read()  # type: ignore[union-attr]
        yield m.group(1), m.group(2), int(m.group(3)), raw.decode("utf-8", errors="replace")
  except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
    raise DataError(f"{path} is not a readable IMDB tar archive: {e}") from e


def _imdb_records_from_dir(root: pathlib.Path) -> Iterator[tuple[str, str, int, str]]:
  for split in ("train", "test"):
    for label in ("pos", "neg"):
      folder = root / split / label
      if not folder.is_dir():
        continue
      for f in folder.iterdir():
        m = _IMDB_MEMBER_RE.search(f"{split}/{label}/{f.name}")
        if m is not None:
          yield split, label, int(m.group(3)), f.read_text("utf-8", errors="replace")


def read_imdb(data_dir: str | os.PathLike) -> TokenizedCorpus:
  """Parses and tokenizes the labelled IMDB reviews (train then test; neg then pos; by id)."""
  source = find_imdb_source(data_dir)
  records = (_imdb_records_from_dir(source) if source.is_dir()
             else _imdb_records_from_tar(source))
  rows = sorted(records, key=lambda r: (r[0] != "train", r[1] != "neg", r[2]))
  found = {(s, l): 0 for s in ("train", "test") for l in ("pos", "neg")}
  for s, l, _, _ in rows:
    found[(s, l)] += 1
  missing = [f"{s}/{l}" for (s, l), n in found.items() if n == 0]
  if missing:
    raise DataError(f"{source} is not a complete aclImdb data set: no reviews in "
                    f"{', '.join(missing)} (found {sum(found.values())} review files)")
  return TokenizedCorpus.from_documents(
      [tokenize(text) for *_, text in rows],
      labels=[int(l == "pos") for _, l, _, _ in rows],
      is_test=[s == "test" for s, _, _, _ in rows])


def _find_mr_file(root: pathlib.Path, polarity: str) -> pathlib.Path:
  for name in (f"rt-polarity.{polarity}", f"rt-polarity.{polarity}.gz"):
    if (root / name).is_file():
      return root / name
  raise FileNotFoundError(f"MR file rt-polarity.{polarity}[.gz] not found in {root}")


def _read_mr_lines(path: pathlib.Path) -> list[str]:
  try:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read MR file {path}: {e}") from e
  if b"\x00" in raw:
    raise DataError(f"{path} looks binary (NUL bytes); expected Latin-1 text, one snippet "
                    "per line")
  # One snippet per line: split at "\n" only. str.splitlines() would also split at
  # U+0085, which Latin-1 decodes from byte 0x85 (cp1252's ellipsis) inside snippets.
  lines = [ln.rstrip("\r") for ln in raw.decode("latin-1").split("\n") if ln.strip()]
  if not lines:
    raise DataError(f"MR file {path} has no sentences")
  return lines


def mr_sources(data_dir: str | os.PathLike) -> dict[str, pathlib.Path]:
  root = pathlib.Path(data_dir).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"MR data directory {root} does not exist")
  return {p: _find_mr_file(root, p) for p in ("neg", "pos")}


def read_mr(data_dir: str | os.PathLike) -> TokenizedCorpus:
  """Reads MR (Pang & Lee 2005): negative snippets first, then positive."""
  docs, labels = [], []
  for label, path in enumerate(mr_sources(data_dir).values()):  # neg=0, pos=1
    lines = _read_mr_lines(path)
    docs += [tokenize(ln) for ln in lines]
    labels += [label] * len(lines)
  return TokenizedCorpus.from_documents(docs, labels, [False] * len(docs))


def load_corpus(dataset: str, data_dir: str | os.PathLike,
                cache_dir: str | os.PathLike | None = None) -> TokenizedCorpus:
  """Reads a data set, through an ``.npz`` cache in ``cache_dir`` when one is given."""
  if dataset == "imdb":
    sources = [find_imdb_source(data_dir)]
    reader = read_imdb
  elif dataset == "mr":
    sources = list(mr_sources(data_dir).values())
    reader = read_mr
  else:
    raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
  if cache_dir is None:
    return reader(data_dir)
  if sources[0].is_dir():  # An extracted folder: key on its path only.
    sigs = [{"path": str(sources[0].resolve())}]
  else:
    sigs = [_file_signature(s) for s in sources]
  meta = {"version": _CACHE_VERSION, "dataset": dataset, "sources": sigs}
  key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
  path = pathlib.Path(cache_dir) / f"{dataset}-tokens-{key}.npz"
  corpus = TokenizedCorpus.load(path, meta) if path.exists() else None
  if corpus is None:
    corpus = reader(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    corpus.save(path, meta)
  return corpus


# -----------------------------------------------------------------------------------------
# Splits and encoding.
# -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Split:
  """Encoded examples: ``tokens[i, :lengths[i]]`` is example ``i``; the rest is padding."""

  tokens: np.ndarray   # [N, max_len] int32
  lengths: np.ndarray  # [N] int32, >= 1
  labels: np.ndarray   # [N] int32

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, idx: np.ndarray) -> Split:
    return Split(self.tokens[idx], self.lengths[idx], self.labels[idx])


@dataclasses.dataclass
class ClassificationData:
  train: Split
  valid: Split
  test: Split
  vocab: Vocab
  num_classes: int = 2


def encode_documents(corpus: TokenizedCorpus, docs: np.ndarray, raw_to_vocab: np.ndarray, *,
                     max_len: int, truncate: str = "pre") -> Split:
  """Maps documents to vocabulary ids, truncating to ``max_len`` and right-padding.

  ``truncate="pre"`` drops the beginning of a long document (keeps its end, where reviews
  tend to state their verdict); ``"post"`` keeps the beginning.
  """
  if truncate not in ("pre", "post"):
    raise ValueError(f"truncate must be 'pre' or 'post'; got {truncate!r}")
  tokens = np.full((len(docs), max_len), PAD_ID, dtype=np.int32)
  lengths = np.zeros((len(docs),), dtype=np.int32)
  for row, i in enumerate(docs):
    seq = raw_to_vocab[corpus.ids[corpus.offsets[i]:corpus.offsets[i + 1]]]
    if len(seq) == 0:  # e.g. a review of only markup: keep one <unk> so no row is empty.
      seq = np.array([UNK_ID], dtype=np.int32)
    seq = seq[-max_len:] if truncate == "pre" else seq[:max_len]
    tokens[row, :len(seq)] = seq
    lengths[row] = len(seq)
  return Split(tokens, lengths, corpus.labels[docs].copy())


def split_indices(corpus: TokenizedCorpus, dataset: str, *, valid_fraction: float,
                  split_seed: int, mr_fold: int = 0) -> tuple[np.ndarray, ...]:
  """(train, valid, test) document indices.

  IMDB: the official test split is the test set; ``valid_fraction`` of the official train
  split (a seeded random subset) is held out for per-epoch evaluation. MR: documents are
  shuffled with ``split_seed`` and cut into 10 folds; fold ``mr_fold`` is the test set and
  ``valid_fraction`` of the rest is held out.
  """
  rng = np.random.default_rng(split_seed)
  n = len(corpus)
  if dataset == "mr":
    if not 0 <= mr_fold < MR_NUM_FOLDS:
      raise ValueError(f"mr_fold must be in [0, {MR_NUM_FOLDS}); got {mr_fold}")
    perm = rng.permutation(n)
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[perm] = np.arange(n) % MR_NUM_FOLDS
    test = np.flatnonzero(fold_of == mr_fold)
    rest = np.flatnonzero(fold_of != mr_fold)
  else:
    test = np.flatnonzero(corpus.is_test)
    rest = np.flatnonzero(~corpus.is_test)
  rest = rng.permutation(rest)
  n_valid = int(round(valid_fraction * len(rest)))
  valid, train = np.sort(rest[:n_valid]), np.sort(rest[n_valid:])
  return train, valid, test


def load_dataset(dataset: str, data_dir: str | os.PathLike, *, vocab_size: int | None = 30000,
                 min_count: int = 1, max_len: int = 400, truncate: str = "pre",
                 valid_fraction: float = 0.05, split_seed: int = 0, mr_fold: int = 0,
                 max_examples: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> ClassificationData:
  """Loads, splits, builds the vocabulary from the training split only, and encodes.

  ``max_examples`` (for smoke tests) keeps a seeded random subset of at most that many
  examples in each of train, valid and test, *before* the vocabulary is built.
  """
  corpus = load_corpus(dataset, data_dir, cache_dir)
  train, valid, test = split_indices(corpus, dataset, valid_fraction=valid_fraction,
                                     split_seed=split_seed, mr_fold=mr_fold)
  if max_examples is not None:
    rng = np.random.default_rng(split_seed + 1)
    train, valid, test = (np.sort(rng.permutation(s)[:max_examples])
                          for s in (train, valid, test))
  vocab = build_vocab(corpus.word_counts(train), max_size=vocab_size, min_count=min_count)
  raw_to_vocab = np.full(len(corpus.words), UNK_ID, dtype=np.int32)
  for raw_id, word in enumerate(corpus.words.tolist()):
    raw_to_vocab[raw_id] = vocab.id(word)
  enc = lambda docs: encode_documents(corpus, docs, raw_to_vocab, max_len=max_len,
                                      truncate=truncate)
  return ClassificationData(train=enc(train), valid=enc(valid), test=enc(test), vocab=vocab)


# -----------------------------------------------------------------------------------------
# Batching.
# -----------------------------------------------------------------------------------------


def bucketed_batches(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                     chunk_batches: int = 50, drop_remainder: bool = True) -> list[np.ndarray]:
  """Index batches for one epoch, grouped by length so padding stays small.

  The examples are shuffled (seeded by ``seed`` and ``epoch``), cut into chunks of
  ``chunk_batches * batch_size``, each chunk is sorted by length and cut into batches, and
  the batch order is shuffled. Chunking keeps batches random across epochs while examples
  of similar length still share a batch.
  """
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(len(lengths))
  chunk = max(1, chunk_batches) * batch_size
  batches = []
  for start in range(0, len(perm), chunk):
    part = perm[start:start + chunk]
    part = part[np.argsort(lengths[part], kind="stable")]
    batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
  if drop_remainder:
    batches = [b for b in batches if len(b) == batch_size]
  order = rng.permutation(len(batches))
  return [batches[i] for i in order]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Every example once, sorted by length (the last batch may be short)."""
  order = np.argsort(lengths, kind="stable")
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_length(max_length: int, pad_multiple: int, max_len: int) -> int:
  return min(max_len, -(-max_length // pad_multiple) * pad_multiple)


def make_batch(split: Split, idx: np.ndarray, *, pad_multiple: int = 32,
               batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Gathers a batch: ``tokens`` and ``mask`` ``[B, L]``, ``labels`` and ``weights`` ``[B]``.

  ``L`` is the longest length in the batch rounded up to ``pad_multiple``. With
  ``batch_size`` a short batch is filled with weight-0 copies of its first example, so every
  batch has the same leading dimension.
  """
  idx = np.asarray(idx)
  weights = np.ones(len(idx), dtype=np.float32)
  if batch_size is not None and len(idx) < batch_size:
    fill = batch_size - len(idx)
    idx = np.concatenate([idx, np.full(fill, idx[0], dtype=idx.dtype)])
    weights = np.concatenate([weights, np.zeros(fill, dtype=np.float32)])
  lengths = split.lengths[idx]
  width = padded_length(int(lengths.max()), pad_multiple, split.tokens.shape[1])
  tokens = split.tokens[idx, :width]
  mask = np.arange(width)[None, :] < lengths[:, None]
  return {"tokens": tokens, "mask": mask, "labels": split.labels[idx], "weights": weights}


def padded_batch(split: Split, idx: np.ndarray, rows: int, *,
                 pad_multiple: int = 32) -> dict[str, np.ndarray]:
  """The examples ``idx`` then ``rows - len(idx)`` filler rows: a batch of static size.

  As :func:`make_batch` (width: the longest example rounded up to ``pad_multiple``), but
  the filler rows are no data: one ``<unk>`` token, label 0, ``weights`` 0, so they
  contribute exactly nothing to a weighted loss, its gradient or its metrics. For
  DP-SGD's Poisson batches, whose size varies from step to step (``idx`` may be empty).
  """
  idx = np.asarray(idx, dtype=np.int64)
  n = len(idx)
  if n > rows:
    raise ValueError(f"{n} examples do not fit in {rows} rows")
  lengths = np.ones(rows, dtype=np.int32)
  lengths[:n] = split.lengths[idx]
  width = padded_length(int(lengths.max()), pad_multiple, split.tokens.shape[1])
  tokens = np.full((rows, width), PAD_ID, dtype=np.int32)
  tokens[:n] = split.tokens[idx, :width]
  tokens[n:, 0] = UNK_ID
  labels = np.zeros(rows, dtype=np.int32)
  labels[:n] = split.labels[idx]
  mask = np.arange(width)[None, :] < lengths[:, None]
  weights = (np.arange(rows) < n).astype(np.float32)
  return {"tokens": tokens, "mask": mask, "labels": labels, "weights": weights}
