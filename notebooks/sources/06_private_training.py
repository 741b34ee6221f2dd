# %% [markdown]
# # Private training: DP-SGD on IMDB with per-example clipping
#
# DP-SGD (Abadi et al., 2016) makes every training step differentially private:
#
# 1. clip **each example's** gradient to L2 norm `C` (so no single review can move the
#    model by more than `C`),
# 2. sum the clipped gradients and add Gaussian noise of standard deviation `σ·C`,
# 3. divide by the (expected) batch size `B` and hand the result to the optimizer.
#
# `gradclip_jax.clipped_grad` does step 1 without materialising per-example gradients
# ("ghost" norms) for any JAX model, whatever library built it: it traces the loss,
# finds every operation that reads a parameter, and computes each example's norm from
# that operation's inputs and output gradients, with one rule per primitive (matrix
# products, embedding lookups, elementwise scales and biases, convolutions, also inside
# scans). `add_noise` does step 2, and `gradclip_jax.dp.accounting` turns `σ`, the
# sampling rate `q = B/N` and the number of steps into `(ε, δ)`. That accounting holds for
# Poisson sampling, where every review joins each step's batch independently with
# probability `q`; the trainer, `gradclip classify --dp`, samples its batches exactly so
# and wires the rest together. The [DP guide](../guides/dp.md) covers the API.
#
# This notebook
#
# 1. looks at the per-example gradient norms of a batch of IMDB reviews, clipped and
#    unclipped,
# 2. trains the `imdb_dp` bag-of-embeddings classifier with DP-SGD at ε = 8 and ε = 3 (and
#    without privacy, for reference), showing accuracy and ε over the epochs,
# 3. shows how ε grows with the number of epochs for a few noise multipliers.
#
# The full runs (40 epochs, a few minutes each on a 2-core CPU) are
# `gradclip classify --dataset imdb --config imdb_dp --data-dir ../shared/data/imdb
# --workdir runs/imdb_dp_eps8 --dp --target-epsilon 8 --delta 1e-5` (and `3`). To stay
# within a few minutes, this notebook trains for 15 epochs.

# %%
import contextlib
import dataclasses
import io
import logging
import os
import pathlib
import tempfile
import time
import warnings

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import gradclip_jax
from gradclip_jax.dp import accounting
from gradclip_jax.training import dp as dp_flags
from gradclip_jax.training.classify import configs, input_pipeline, train
from gradclip_jax.training.options import RunOptions

QUICK = os.environ.get("GRADCLIP_QUICK") == "1"
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's per-order notices
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook
DATA = pathlib.Path(os.environ.get("GRADCLIP_DATA_DIR", "../../shared/data")) / "imdb"
if not DATA.exists():
    DATA = pathlib.Path("../../shared/data/imdb")
CACHE = pathlib.Path(tempfile.mkdtemp(prefix="imdb_cache_"))

cfg = configs.get_config("imdb_dp")
if QUICK:  # the tests: a small subset, a few epochs
    cfg = dataclasses.replace(cfg, max_examples=2048, batch_size=256, eval_batch_size=256,
                              max_epochs=3)
else:
    cfg = dataclasses.replace(cfg, max_epochs=15)
data = input_pipeline.load_dataset(
    "imdb", DATA, vocab_size=cfg.vocab_size, max_len=cfg.max_len,
    valid_fraction=cfg.valid_fraction, max_examples=cfg.max_examples, cache_dir=CACHE)
print(f"train {len(data.train)}, valid {len(data.valid)}, test {len(data.test)} reviews; "
      f"vocabulary {len(data.vocab)}")
print(cfg)

# %% [markdown]
# ## 1. Per-example gradient norms
#
# The model is the `imdb_dp` config: 16-dimensional word vectors, their masked mean over
# the review, and a dense layer (160k parameters). `clipped_grad` takes a loss that returns
# **one loss per example** and gives the clipped sum; with `return_norms=True` it also
# returns every example's gradient norm before clipping. Here it runs on 1024 reviews,
# with the ghost method; `max_norm=inf` gives the plain, unclipped sum.
# `gradclip_jax.dp.ghost_coverage` shows the rule each parameter gets: `gather` (segment
# sums over each review's token ids) for the embedding, `dot_general` and `elementwise`
# for the dense layer's kernel and bias; none needs the per-example fallback.

# %%
model = train.make_model(cfg, len(data.vocab))
batch = input_pipeline.make_batch(data.train, np.arange(min(1024, len(data.train))),
                                  pad_multiple=cfg.pad_multiple)
params = model.init(jax.random.key(0), batch["tokens"][:1], batch["mask"][:1])["params"]


def per_example_loss(p, tokens, mask, labels):
    logits = model.apply({"params": p}, tokens, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# A few hundred non-private Adam steps first, so the norms are those of a model that has
# learnt something (at initialisation all reviews look alike).
opt = optax.adam(0.02)
opt_state = opt.init(params)


@jax.jit
def plain_step(p, s, tokens, mask, labels):
    g = jax.grad(lambda p: per_example_loss(p, tokens, mask, labels).mean())(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s


warm_params = params
warm = input_pipeline.bucketed_batches(data.train.lengths, 256, seed=0, epoch=0)[:90]
for idx in warm:
    b = input_pipeline.make_batch(data.train, idx, pad_multiple=cfg.pad_multiple)
    warm_params, opt_state = plain_step(warm_params, opt_state, b["tokens"], b["mask"],
                                        b["labels"])
TRAINED = f"after {len(warm)} Adam steps"

C = cfg.max_grad_norm
args = (batch["tokens"], batch["mask"], batch["labels"])
for leaf, rule in gradclip_jax.dp.ghost_coverage(per_example_loss, params, *args).items():
    print(f"{leaf:24s} {rule}")
results = {}
for name, p in (("at initialisation", params), (TRAINED, warm_params)):
    clipped_sum, norms = jax.jit(gradclip_jax.clipped_grad(
        per_example_loss, max_norm=C, method="ghost", return_norms=True))(p, *args)
    plain_sum = jax.jit(gradclip_jax.clipped_grad(per_example_loss, max_norm=np.inf,
                                                  method="ghost"))(p, *args)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    a, b = flat(clipped_sum), flat(plain_sum)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    results[name] = np.asarray(norms)
    print(f"{name:20s}: per-example norm median {np.median(norms):.3f}, max "
          f"{np.max(norms):.3f}; {np.mean(norms > C):.0%} clipped at C = {C}; "
          f"cos(clipped sum, plain sum) = {cos:.4f}")

# The ghost norms are exact: the vmap reference (one gradient per example) agrees.
small = tuple(x[:64] for x in args)
_, ref = gradclip_jax.clipped_grad(per_example_loss, max_norm=C, method="vmap",
                                   return_norms=True)(warm_params, *small)
print("max |ghost - vmap| / norm on 64 reviews:",
      float(np.max(np.abs(results[TRAINED][:64] - ref) / ref)))

# %%
norms = results[TRAINED]
losses = np.asarray(per_example_loss(warm_params, *args))
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
bins = np.linspace(0, np.percentile(norms, 99.5), 60)
axes[0].hist(norms, bins=bins, alpha=0.6, label="unclipped")
axes[0].hist(np.minimum(norms, C), bins=bins, alpha=0.6, label=f"clipped to C = {C}")
axes[0].axvline(C, color="k", ls=":", lw=1)
axes[0].set_title(f"per-example gradient norms, {TRAINED}")
axes[0].set_xlabel("L2 norm"); axes[0].legend()
axes[1].hist(results["at initialisation"], bins=60, color="grey")
axes[1].set_title("the same, at initialisation"); axes[1].set_xlabel("L2 norm")
axes[2].loglog(losses, norms, ".", ms=3, alpha=0.5)
axes[2].axhline(C, color="k", ls=":", lw=1)
axes[2].set_xlabel("per-example loss"); axes[2].set_ylabel("per-example norm")
axes[2].set_title("the reviews the model gets wrong are clipped")
plt.tight_layout(); plt.show()
print(f"correlation of norm and loss: {np.corrcoef(norms, losses)[0, 1]:.2f}")

# %% [markdown]
# At initialisation every review has about the same norm, about 0.71: the gradient of the
# output bias, `softmax - onehot`, dominates. Once the model has learnt something, the
# reviews it already classifies confidently have tiny gradients and the misclassified ones
# have large ones, so clipping at `C` mostly shortens the gradients of the misclassified
# reviews. Clipping caps what any single review can contribute. With `C` well above the
# median norm, the clipped sum still points almost the same way as the plain sum (see the
# cosine printed above).
#
# ## 2. DP-SGD training at ε = 8 and ε = 3
#
# `train.train_and_evaluate` is the body of `gradclip classify`; the
# `RunOptions(clip="dp", dp=DPFlags(...))` below is what `--dp --target-epsilon E
# --delta 1e-5` builds. The noise multiplier is derived
# from the target over the planned run (epochs × steps per epoch), and every epoch's line
# of `metrics.jsonl` records the ε spent so far. The batches are Poisson-sampled, as the
# accountant assumes: each review joins a step's batch independently with probability
# `q = B/N`, so the batch size varies around `B`; a batch is padded to a fixed capacity
# with masked rows (which change neither the gradient nor any metric), and a larger draw
# runs whole, never truncated. Every epoch's record has the realized batch sizes, and
# `results.json` the sampler and the accountant's event.

# %%
runs = {}
for name, dp in (("non-private", None),
                 ("DP, ε = 8", dp_flags.DPFlags(target_epsilon=8.0, delta=1e-5)),
                 ("DP, ε = 3", dp_flags.DPFlags(target_epsilon=3.0, delta=1e-5))):
    t0 = time.time()
    run = RunOptions(data_dir=DATA, clip="dp" if dp else "none", progress=False,
                     checkpoint_every=0, dp=dp)
    config = configs.TrainConfig(run=run, dataset="imdb", hparams=cfg, name="imdb_dp",
                                 cache_dir=CACHE)
    log = io.StringIO()  # the trainer's per-epoch lines; the records hold the same
    with contextlib.redirect_stdout(log):
        res = train.train_and_evaluate(config, workdir=tempfile.mkdtemp(prefix="dp_run_"))
    runs[name] = res
    if dp is not None:
        print(next(l for l in log.getvalue().splitlines() if l.startswith("DP-SGD")))
    recs = res["records"]
    extra = (f", noise multiplier {recs[-1]['noise_multiplier']:.3f}, ε spent "
             f"{recs[-1]['epsilon']:.2f}; Poisson batch sizes "
             f"{min(r['batch_size_min'] for r in recs)} to "
             f"{max(r['batch_size_max'] for r in recs)} (mean "
             f"{np.mean([r['batch_size_mean'] for r in recs]):.1f}, capacity "
             f"{res['dp']['sampler']['capacity']})") if dp else ""
    print(f"==> {name}: test accuracy {res['test_acc']:.2%}{extra} "
          f"({time.time() - t0:.0f} s)\n")

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for color, (name, res) in zip(("C0", "C1", "C2"), runs.items()):
    recs = res["records"]
    epochs = [r["epoch"] for r in recs]
    style = dict(marker="o", ms=3, color=color, label=name)
    axes[0].plot(epochs, [r["eval_acc"] for r in recs], **style)
    axes[1].plot(epochs, [r["train_loss"] for r in recs], **style)
    if "epsilon" in recs[0]:
        axes[2].plot(epochs, [r["epsilon"] for r in recs], **style)
axes[0].set_title("validation accuracy"); axes[1].set_title("training loss")
axes[2].set_title("ε spent (δ = 1e-5)")
for ax in axes:
    ax.set_xlabel("epoch"); ax.legend()
plt.tight_layout(); plt.show()
print(f"{'run':14s} {'test acc':>9s} {'σ':>7s} {'ε':>6s} {'clipped':>8s}")
for name, res in runs.items():
    r = res["records"][-1]
    if "epsilon" in r:
        print(f"{name:14s} {res['test_acc']:9.2%} {r['noise_multiplier']:7.3f} "
              f"{r['epsilon']:6.2f} {r['clip_fraction']:8.1%}")
    else:
        print(f"{name:14s} {res['test_acc']:9.2%} {'-':>7s} {'inf':>6s} {'-':>8s}")

# %% [markdown]
# Noise costs accuracy, and a smaller ε costs more. ε grows quickly over the first epochs
# and then roughly with the square root of the number of steps, so training longer at a
# fixed target means more noise per step (the noise multiplier above is larger for ε = 3).
#
# ## 3. How ε grows: the accountant
#
# ε after `k` epochs for a few noise multipliers, at this run's sampling rate. The
# accountant is Google's `dp-accounting` (RDP), wrapped by `gradclip_jax.dp.accounting`.

# %%
n_train, bsz = len(data.train), cfg.batch_size
q = bsz / n_train
steps_per_epoch = n_train // bsz
epochs = np.arange(1, (10 if QUICK else 60) + 1, 1 if QUICK else 3)
fig, ax = plt.subplots(figsize=(6, 4))
for sigma in (0.8, 1.1, 1.5, 2.5):
    eps = [accounting.epsilon_spent(sigma, q, int(e * steps_per_epoch), 1e-5) for e in epochs]
    ax.plot(epochs, eps, label=f"σ = {sigma}")
ax.axhline(8, color="grey", ls=":", lw=1); ax.axhline(3, color="grey", ls=":", lw=1)
ax.set_xlabel("epochs"); ax.set_ylabel("ε (δ = 1e-5)"); ax.set_ylim(0, 20)
ax.set_title(f"q = {bsz}/{n_train}"); ax.legend()
plt.tight_layout(); plt.show()
for target in (8.0, 3.0):
    sig = accounting.noise_multiplier_for_epsilon(target, 1e-5, q, 40 * steps_per_epoch)
    print(f"ε = {target:g} over 40 epochs needs noise multiplier {sig:.3f}")
