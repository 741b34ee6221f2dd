"""``gradclip data fetch`` against a local HTTP server on loopback.

There is no internet here: a ``http.server`` bound to 127.0.0.1 (port 0) serves archives
built from ../shared/data in the original archives' member layout (Mikolov's
``simple-examples.tgz``, ``aclImdb_v1.tar.gz``, ``rt-polaritydata.tar.gz``), plus broken
ones. The fetched folders are read with the trainers' real loaders and compared byte for
byte with the shared files; every broken case must exit 2 with one line and leave the
target's parent exactly as it was.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import tarfile
import threading

import pytest

from gradclip_jax.training import fetch as data_fetch
from gradclip_jax.training.classify import input_pipeline as classify_input
from gradclip_jax.training.ptb import input_pipeline as ptb_input

PTB_SPLITS = ("train", "valid", "test")


# -----------------------------------------------------------------------------------------
# Archives, built from the shared data.
# -----------------------------------------------------------------------------------------


def _tar_gz(members: list[tuple[str, bytes | None]], *, links: dict[str, str] | None = None
            ) -> bytes:
  """A .tar.gz of ``(name, data)`` members (``data=None``: a folder), in the given order."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.mtime = 1_100_000_000
      if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(info)
      else:
        info.size, info.mode = len(data), 0o644
        tf.addfile(info, io.BytesIO(data))
    for name, target in (links or {}).items():
      info = tarfile.TarInfo(name)
      info.type, info.linkname = tarfile.SYMTYPE, target
      tf.addfile(info)
  return buf.getvalue()


def _gz_member_no_end(name: str, data: bytes) -> bytes:
  """One tar member (header + padded data, no end-of-archive blocks), gzip-compressed."""
  info = tarfile.TarInfo(name)
  info.size, info.mode, info.mtime = len(data), 0o644, 1_100_000_000
  pad = b"\0" * (-len(data) % tarfile.BLOCKSIZE)
  return gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT) + data + pad, compresslevel=1)


@pytest.fixture(scope="module")
def plain(shared_data_dir: pathlib.Path) -> dict[str, bytes]:
  """The original bytes of the PTB and MR files (zcat of the shared .gz files)."""
  files = {f"ptb.{s}.txt": gzip.decompress((shared_data_dir / "ptb" / f"ptb.{s}.txt.gz")
                                           .read_bytes()) for s in PTB_SPLITS}
  for p in ("pos", "neg"):
    files[f"rt-polarity.{p}"] = gzip.decompress(
        (shared_data_dir / "rt-polarity" / f"rt-polarity.{p}.gz").read_bytes())
  return files


def _ptb_members(plain: dict[str, bytes], **replace: bytes) -> list[tuple[str, bytes | None]]:
  """simple-examples.tgz's layout: ./simple-examples/data/ptb.*.txt among other files."""
  members: list[tuple[str, bytes | None]] = [
      ("./simple-examples/", None), ("./simple-examples/data/", None),
      ("./simple-examples/data/ptb.char.train.txt", b"a b c\n"),
      ("./simple-examples/1-train/", None), ("./simple-examples/1-train/README", b"rnnlm\n")]
  for s in PTB_SPLITS:
    name = f"ptb.{s}.txt"
    members.append((f"./simple-examples/data/{name}", replace.get(s, plain[name])))
  return members


def _mr_members(plain: dict[str, bytes]) -> list[tuple[str, bytes | None]]:
  return [("rt-polaritydata.README.1.0.txt", b"sentence polarity dataset v1.0\n"),
          ("rt-polaritydata/", None),
          ("rt-polaritydata/rt-polarity.neg", plain["rt-polarity.neg"]),
          ("rt-polaritydata/rt-polarity.pos", plain["rt-polarity.pos"])]


@pytest.fixture(scope="module")
def archives(plain: dict[str, bytes], shared_data_dir: pathlib.Path) -> dict[str, bytes]:
  """URL path -> bytes the loopback server returns."""
  ptb = _tar_gz(_ptb_members(plain))
  mr = _tar_gz(_mr_members(plain))
  valid = bytearray(plain["ptb.valid.txt"])
  valid[1000] = ord("X") if valid[1000] != ord("X") else ord("Y")  # same size, other bytes
  imdb = (_gz_member_no_end("aclImdb/train/unsup/0_0.txt", b"an unlabelled review")
          + _gz_member_no_end("aclImdb/train/labeledBow.feat", b"9 0:9 1:1\n")
          + (shared_data_dir / "imdb" / "aclImdb_v1_labeled.tar.gz").read_bytes())
  return {
      "/ptb/simple-examples.tgz": ptb,
      "/mr/rt-polaritydata.tar.gz": mr,
      "/imdb/aclImdb_v1.tar.gz": imdb,
      "/bad/flipped-byte.tgz": _tar_gz(_ptb_members(plain, valid=bytes(valid))),
      "/bad/truncated-file.tgz": ptb[:len(ptb) // 2],
      "/bad/wrong-member.tgz": _tar_gz(_mr_members(plain)[:3]),  # no rt-polarity.pos
      "/bad/ptb-as-mr.tgz": ptb,
      "/bad/dotdot.tgz": _tar_gz([("../escaped.txt", b"x")] + _mr_members(plain)),
      "/bad/absolute.tgz": _tar_gz(_mr_members(plain) + [("/tmp/escaped.txt", b"x")]),
      "/bad/symlink.tgz": _tar_gz(_mr_members(plain)[:3],
                                  links={"rt-polaritydata/rt-polarity.pos": "/etc/passwd"}),
      "/bad/not-a-tar.tgz": b"<html><body>moved</body></html>\n",
  }


class _Handler(http.server.BaseHTTPRequestHandler):
  timeout = 30  # a stuck connection cannot hang the test

  def do_GET(self):  # noqa: N802 (the http.server name)
    """Serves ``files``; a path prefix changes how (see the cases below)."""
    files = self.server.files  # type: ignore[attr-defined]
    self.server.requests.append(self.path)  # type: ignore[attr-defined]
    mode, _, rest = self.path.partition("/mode-")
    mode, path = (rest.split("/", 1)[0], "/" + rest.split("/", 1)[1]) if rest else ("", mode)
    if path not in files:
      self.send_error(404, "Not Found")
      return
    data = files[path]
    self.send_response(200)
    self.send_header("Content-Type", "application/octet-stream")
    if mode != "no-length":  # no-length: the body ends when the connection closes
      self.send_header("Content-Length", str(len(data)))  # the full length, also when cut
    self.end_headers()
    if mode == "cut":  # a third of the body, then the connection closes
      self.wfile.write(data[:len(data) // 3])
    elif mode == "stall":  # the headers, then silence
      self.server.release.wait(timeout=10)  # type: ignore[attr-defined]
    else:
      self.wfile.write(data)
    self.wfile.flush()

  def log_message(self, *args):  # keep the test output clean
    pass


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    """A client that hangs up early (the Ctrl-C and time-out tests) is expected here."""


@pytest.fixture(scope="module")
def server(archives):
  httpd = _Server(("127.0.0.1", 0), _Handler)
  httpd.files = archives  # type: ignore[attr-defined]
  httpd.requests = []  # type: ignore[attr-defined]
  httpd.release = threading.Event()  # type: ignore[attr-defined]
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
  finally:
    httpd.release.set()  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
  """Loopback requests must not go through a proxy configured in the environment."""
  for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _parser() -> argparse.ArgumentParser:
  """``gradclip data ...`` as the trainers' cli.py builds it."""
  parser = argparse.ArgumentParser(prog="gradclip")
  sub = parser.add_subparsers(dest="command", required=True)
  data_fetch.add_arguments(sub.add_parser("data"))
  return parser


def _run(argv: list[str]) -> int:
  args = _parser().parse_args(["data", "fetch", *argv])
  return data_fetch.main(args)


def _listing(folder: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -----------------------------------------------------------------------------------------
# Successful fetches, read with the real loaders.
# -----------------------------------------------------------------------------------------


def test_ptb_fetch_loads_and_matches_the_shared_files(server, plain, tmp_path, capsys):
  url, _ = server
  target = tmp_path / "data" / "ptb"  # the parent "data" does not exist yet
  got = data_fetch.fetch("ptb", target, url=f"{url}/ptb/simple-examples.tgz")
  assert got == target
  assert _listing(tmp_path) == ["data", "data/ptb", "data/ptb/ptb.test.txt",
                                "data/ptb/ptb.train.txt", "data/ptb/ptb.valid.txt"]
  for s in PTB_SPLITS:
    assert (target / f"ptb.{s}.txt").read_bytes() == plain[f"ptb.{s}.txt"]
  ptb = ptb_input.load_ptb(target)
  assert len(ptb.vocab) == 10_000
  # Tokens including one <eos> per line, as in the shared README: 929,589 / 73,760 / 82,430.
  assert (len(ptb.train), len(ptb.valid), len(ptb.test)) == (929_589, 73_760, 82_430)
  err = capsys.readouterr().err
  assert "simple-examples.tgz:" in err and "MB" in err and "(100%)" in err and "/s" in err


def test_mr_fetch_through_the_command_line(server, plain, shared_data_dir, tmp_path, capsys):
  url, _ = server
  target = tmp_path / "mr"
  assert _run(["mr", str(target), "--url", f"{url}/mr/rt-polaritydata.tar.gz"]) == 0
  assert _listing(tmp_path) == ["mr", "mr/rt-polarity.neg", "mr/rt-polarity.pos"]
  for p in ("pos", "neg"):
    assert (target / f"rt-polarity.{p}").read_bytes() == plain[f"rt-polarity.{p}"]
  # The loader reads the fetched folder exactly as it reads the shared one (the files
  # themselves, 5,331 lines each, are checked byte for byte above).
  corpus = classify_input.read_mr(target)
  shared = classify_input.read_mr(shared_data_dir / "rt-polarity")
  assert corpus.labels.tolist() == shared.labels.tolist()
  assert corpus.words.tolist() == shared.words.tolist()
  assert corpus.ids.tolist() == shared.ids.tolist()
  out = capsys.readouterr().out
  assert f"classify --dataset mr --data-dir {target}" in out


@pytest.fixture
def fast_tmp(tmp_path):
  """A scratch folder in RAM (/dev/shm) where there is one: IMDB is 50,000 small files."""
  shm = pathlib.Path("/dev/shm")
  if not (shm.is_dir() and os.access(shm, os.W_OK)):
    yield tmp_path
    return
  with tempfile.TemporaryDirectory(dir=shm, prefix="gradclip-test-fetch-") as d:
    yield pathlib.Path(d)


def test_imdb_fetch_skips_unlabelled_and_loads_25k_25k(server, shared_data_dir, fast_tmp,
                                                      capsys, monkeypatch):
  url, _ = server
  target = fast_tmp / "imdb"
  assert _run(["imdb", str(target), "--url", f"{url}/imdb/aclImdb_v1.tar.gz",
               "--no-progress"]) == 0
  assert capsys.readouterr().err == ""  # --no-progress: nothing on stderr
  root = target / "aclImdb"
  assert sorted(p.name for p in target.iterdir()) == ["aclImdb"]
  assert sorted(p.name for p in root.iterdir()) == ["test", "train"]
  for split in ("train", "test"):
    assert sorted(p.name for p in (root / split).iterdir()) == ["neg", "pos"]
  # Every review is the shared tarball's, byte for byte (and nothing else was unpacked).
  expected = {}
  with tarfile.open(shared_data_dir / "imdb" / "aclImdb_v1_labeled.tar.gz") as tf:
    for m in tf:
      parts = m.name.split("/")
      if m.isfile() and len(parts) == 4 and parts[2] in ("pos", "neg"):
        expected[m.name] = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
  got = {str(p.relative_to(target)): hashlib.sha256(p.read_bytes()).hexdigest()
         for p in root.glob("*/*/*.txt")}
  assert len(expected) == 50_000 and got == expected
  # The real loader reads the folder; its tokenizer (irrelevant here, and most of the time)
  # is replaced by a whitespace split, so the total is the shared README's word count.
  assert classify_input.find_imdb_source(target) == root
  monkeypatch.setattr(classify_input, "tokenize", str.split)
  corpus = classify_input.read_imdb(target)
  assert int(corpus.is_test.sum()) == 25_000 and int((~corpus.is_test).sum()) == 25_000
  assert int(corpus.labels[~corpus.is_test].sum()) == 12_500
  assert int(corpus.labels[corpus.is_test].sum()) == 12_500
  assert len(corpus.ids) == 2_958_832 + 2_885_848 + 2_862_401 + 2_850_766


def test_local_archive_path_as_url(server, archives, tmp_path):
  archive = tmp_path / "downloads" / "rt-polaritydata.tar.gz"
  archive.parent.mkdir()
  archive.write_bytes(archives["/mr/rt-polaritydata.tar.gz"])
  target = tmp_path / "mr"
  assert data_fetch.fetch("mr", target, url=str(archive), progress=False) == target
  assert sorted(p.name for p in target.iterdir()) == ["rt-polarity.neg", "rt-polarity.pos"]
  assert archive.is_file()  # the user's archive is read, not moved


# -----------------------------------------------------------------------------------------
# Refused fetches: exit 2, one line, nothing left behind.
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset,path,message", [
    ("ptb", "/bad/flipped-byte.tgz", "ptb.valid.txt does not match the published file: sha256"),
    ("ptb", "/mode-cut/ptb/simple-examples.tgz", "is truncated"),
    ("ptb", "/bad/truncated-file.tgz", "not a readable tar archive"),
    ("mr", "/bad/wrong-member.tgz", "lacks rt-polaritydata/rt-polarity.pos"),
    ("mr", "/bad/ptb-as-mr.tgz", "lacks rt-polaritydata/rt-polarity.pos"),
    ("mr", "/bad/dotdot.tgz", "points outside its folder"),
    ("mr", "/bad/absolute.tgz", "absolute path"),
    ("mr", "/bad/symlink.tgz", "is not a regular file"),
    ("mr", "/bad/not-a-tar.tgz", "not a readable tar archive"),
    ("mr", "/no/such/archive.tgz", "HTTP 404"),
])
def test_bad_archive_is_refused_and_nothing_is_left(server, tmp_path, capsys, dataset, path,
                                                    message):
  url, _ = server
  parent = tmp_path / "work"
  parent.mkdir()
  (parent / "other-file").write_text("untouched")
  before = _listing(tmp_path)
  assert _run([dataset, str(parent / "data"), "--url", url + path]) == 2
  err = capsys.readouterr().err
  last = err.strip().splitlines()[-1]
  assert last.startswith("gradclip data fetch: error: ") and message in last, err
  assert "Traceback" not in err
  assert _listing(tmp_path) == before
  assert not (tmp_path / "escaped.txt").exists()


def test_failed_canonical_download_suggests_url(monkeypatch, tmp_path):
  # The canonical address, pointed at a closed loopback port (no network is used).
  httpd = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
  port = httpd.server_address[1]
  httpd.server_close()
  source = data_fetch.SOURCES["mr"]
  monkeypatch.setitem(data_fetch.SOURCES, "mr", dataclasses.replace(
      source, url=f"http://127.0.0.1:{port}/rt-polaritydata.tar.gz"))
  with pytest.raises(data_fetch.FetchError, match=r"cannot download .* \(or download "
                     r"http://127\.0\.0\.1:\d+/rt-polaritydata\.tar\.gz by other means "
                     r"and pass its path with --url\)"):
    data_fetch.fetch("mr", tmp_path / "mr", progress=False)
  assert _listing(tmp_path) == []


def test_download_without_a_length(server, plain, tmp_path, capsys):
  url, _ = server
  target = tmp_path / "mr"
  data_fetch.fetch("mr", target, url=f"{url}/mode-no-length/mr/rt-polaritydata.tar.gz")
  assert (target / "rt-polarity.neg").read_bytes() == plain["rt-polarity.neg"]
  err = capsys.readouterr().err
  assert "rt-polaritydata.tar.gz: 0." in err and "MB/s in" in err and "%" not in err


def test_stalled_download_times_out(server, tmp_path, monkeypatch, capsys):
  url, _ = server
  monkeypatch.setattr(data_fetch, "_TIMEOUT_S", 0.5)
  assert _run(["mr", str(tmp_path / "mr"), "--url",
               f"{url}/mode-stall/mr/rt-polaritydata.tar.gz"]) == 2
  err = capsys.readouterr().err
  assert "was interrupted after 0 bytes: timed out" in err, err
  assert _listing(tmp_path) == []


def test_ctrl_c_during_the_download_leaves_nothing(server, tmp_path, monkeypatch, capsys):
  url, _ = server

  def interrupt(self, n):
    raise KeyboardInterrupt

  monkeypatch.setattr(data_fetch._Progress, "update", interrupt)  # pylint: disable=protected-access
  assert _run(["ptb", str(tmp_path / "new" / "ptb"), "--url",
               f"{url}/ptb/simple-examples.tgz"]) == 130
  assert "interrupted; nothing was written" in capsys.readouterr().err
  assert _listing(tmp_path) == []


def test_missing_parents_are_removed_again_after_a_failure(server, tmp_path):
  url, _ = server
  with pytest.raises(data_fetch.FetchError, match="sha256"):
    data_fetch.fetch("ptb", tmp_path / "a" / "b" / "ptb", url=f"{url}/bad/flipped-byte.tgz",
                     progress=False)
  assert _listing(tmp_path) == []


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
  # A port that was just free on loopback: the connection is refused.
  httpd = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
  port = httpd.server_address[1]
  httpd.server_close()
  assert _run(["mr", str(tmp_path / "mr"), "--url", f"http://127.0.0.1:{port}/x.tgz"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("gradclip data fetch: error: cannot download") and "Traceback" not in err
  assert _listing(tmp_path) == []


# -----------------------------------------------------------------------------------------
# The target folder.
# -----------------------------------------------------------------------------------------


def test_existing_target_needs_force(server, tmp_path, capsys):
  url, httpd = server
  target = tmp_path / "mr"
  target.mkdir()
  (target / "notes.txt").write_text("mine")
  n_requests = len(httpd.requests)
  assert _run(["mr", str(target), "--url", f"{url}/mr/rt-polaritydata.tar.gz"]) == 2
  err = capsys.readouterr().err
  assert "already exists and is not empty" in err and "--force" in err
  assert _listing(tmp_path) == ["mr", "mr/notes.txt"]
  assert len(httpd.requests) == n_requests  # refused before downloading anything

  assert _run(["mr", str(target), "--url", f"{url}/mr/rt-polaritydata.tar.gz", "--force",
               "--no-progress"]) == 0
  assert _listing(tmp_path) == ["mr", "mr/rt-polarity.neg", "mr/rt-polarity.pos"]


def test_force_keeps_the_old_folder_when_the_new_download_is_bad(server, tmp_path):
  url, _ = server
  target = tmp_path / "mr"
  target.mkdir()
  (target / "notes.txt").write_text("mine")
  with pytest.raises(data_fetch.FetchError, match="lacks"):
    data_fetch.fetch("mr", target, url=f"{url}/bad/wrong-member.tgz", progress=False,
                     force=True)
  assert _listing(tmp_path) == ["mr", "mr/notes.txt"]


def test_empty_target_is_used_and_a_file_target_refused(server, tmp_path):
  url, _ = server
  empty = tmp_path / "empty"
  empty.mkdir()
  data_fetch.fetch("mr", empty, url=f"{url}/mr/rt-polaritydata.tar.gz", progress=False)
  assert sorted(p.name for p in empty.iterdir()) == ["rt-polarity.neg", "rt-polarity.pos"]
  file_target = tmp_path / "a-file"
  file_target.write_text("x")
  with pytest.raises(data_fetch.FetchError, match="not a folder"):
    data_fetch.fetch("mr", file_target, url=f"{url}/mr/rt-polaritydata.tar.gz", force=True)


# -----------------------------------------------------------------------------------------
# Arguments, the Python API's bad input, the progress bar.
# -----------------------------------------------------------------------------------------


def test_command_line_usage_errors_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    _parser().parse_args(["data", "fetch", "wikitext", str(tmp_path)])
  assert e.value.code == 2 and "invalid choice: 'wikitext'" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # no silent abbreviation of --force
    _parser().parse_args(["data", "fetch", "mr", str(tmp_path), "--forc"])
  assert e.value.code == 2 and "unrecognized arguments: --forc" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    _parser().parse_args(["data"])
  assert e.value.code == 2
  args = _parser().parse_args(["data", "fetch", "ptb", "d"])
  assert (args.data_command, args.dataset, args.directory, args.url, args.force,
          args.progress) == ("fetch", "ptb", "d", None, False, True)
  assert _run(["mr", str(tmp_path / "mr"), "--url", "ftp://example.org/x.tgz"]) == 2
  assert "unsupported URL scheme 'ftp'" in capsys.readouterr().err
  assert _run(["mr", str(tmp_path / "mr"), "--url", str(tmp_path / "none.tgz")]) == 2
  assert "neither a URL nor an existing archive file" in capsys.readouterr().err


def test_through_the_gradclip_command(server, tmp_path, capsys):
  """``gradclip data fetch`` as the console script runs it (training/cli.py)."""
  from gradclip_jax.training import cli  # pylint: disable=import-outside-toplevel
  url, _ = server
  target = tmp_path / "mr"
  assert cli.main(["data", "fetch", "mr", str(target), "--forc"]) == 2
  err = capsys.readouterr().err
  assert "usage: gradclip data fetch" in err and "(did you mean --force?)" in err
  assert cli.main(["data", "fetch", "mr", str(target), "--no-progress",
                   "--url", f"{url}/mr/rt-polaritydata.tar.gz"]) == 0
  assert sorted(p.name for p in target.iterdir()) == ["rt-polarity.neg", "rt-polarity.pos"]
  assert cli.main(["data", "fetch", "mr", str(target), "--url",
                   f"{url}/mr/rt-polaritydata.tar.gz"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("gradclip data fetch: error: ") and err.count("\n") == 1


def test_python_api_bad_input():
  with pytest.raises(ValueError, match="unknown dataset 'sst2'"):
    data_fetch.fetch("sst2", "x")
  with pytest.raises(TypeError, match="directory must be a str or path"):
    data_fetch.fetch("mr", 3)  # type: ignore[arg-type]
  with pytest.raises(TypeError, match="url must be a str"):
    data_fetch.fetch("mr", "x", url=b"http://x")  # type: ignore[arg-type]
  assert data_fetch.command("imdb", "my data") == "gradclip data fetch imdb 'my data'"


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_on_a_terminal_and_in_a_log(monkeypatch):
  clock = iter(float(t) for t in range(100))
  monkeypatch.setattr(data_fetch.time, "monotonic", lambda: next(clock))
  tty = _Terminal()
  bar = data_fetch._Progress("x.tgz", 4_000_000, tty)  # pylint: disable=protected-access
  for _ in range(4):
    bar.update(1_000_000)  # one second per MB
  bar.close()
  shown = tty.getvalue()
  assert shown.startswith("\rx.tgz: 1.0 MB / 4.0 MB ( 25%), 1.0 MB/s")
  assert shown.count("\r") == 5 and shown.endswith("\n")
  assert "4.0 MB / 4.0 MB (100%), 0.8 MB/s in 5.0 s" in shown

  log = io.StringIO()
  bar = data_fetch._Progress("x.tgz", 4_000_000, log)  # pylint: disable=protected-access
  for _ in range(4):
    bar.update(1_000_000)
  bar.close()
  lines = log.getvalue().splitlines()
  assert "\r" not in log.getvalue() and len(lines) == 4  # 25%, 50%, 75%, then the summary
  assert lines[0].startswith("x.tgz: 1.0 MB / 4.0 MB ( 25%)")
  assert lines[-1].startswith("x.tgz: 4.0 MB / 4.0 MB (100%)")


def test_published_constants_match_the_shared_files(plain, tmp_path):
  """The sizes, hashes and counts fetch checks are those of the shared files.

  Words as ``LC_ALL=C wc -w`` counts them (the shared README's counts): whitespace-separated
  runs holding a printable ASCII character; checked with GNU ``wc`` itself where present.
  """
  word = re.compile(rb"[^ \t\n\r\x0b\x0c]*[!-~][^ \t\n\r\x0b\x0c]*")
  wc = shutil.which("wc")
  for source in (data_fetch.SOURCES["ptb"], data_fetch.SOURCES["mr"]):
    for f in source.files:
      data = plain[f.dest]
      assert (len(data), hashlib.sha256(data).hexdigest(), data.count(b"\n"),
              len(word.findall(data))) == (f.size, f.sha256, f.lines, f.words)
      if wc is not None:
        out = subprocess.run([wc, "-lw"], input=data, capture_output=True, check=True,
                             env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")}).stdout
        assert tuple(int(n) for n in out.split()) == (f.lines, f.words)
