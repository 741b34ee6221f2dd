# %% [markdown]
# # The PTB language model with two clipping rules
#
# This notebook trains the *small* configuration of Zaremba et al. (2014), "Recurrent Neural
# Network Regularization" (the TensorFlow PTB tutorial), from inside a notebook. It uses the
# pieces of `gradclip ptb`: the data reader, the model, the tutorial's SGD schedule and the
# jitted train step. Two runs are compared, `clip_by_global_norm(5)` (the tutorial's
# setting) and `autoclip(10)`, and the perplexity, gradient norm and clipped steps are
# plotted.
#
# To keep the notebook to a few minutes on a CPU, it trains on the first 200k training
# tokens for 3 epochs. The full run is
# `gradclip ptb --config small --data-dir ../shared/data/ptb --workdir runs/ptb-small`
# (its test perplexity is on the benchmarks page, `docs/benchmarks.md`).

# %%
import dataclasses
import os
import pathlib
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import gradclip_jax
from gradclip_jax.training.ptb import configs, input_pipeline, train

QUICK = os.environ.get("GRADCLIP_QUICK") == "1"
DATA = pathlib.Path(os.environ.get("GRADCLIP_DATA_DIR", "../../shared/data")) / "ptb"
if not DATA.exists():
    DATA = pathlib.Path("../../shared/data/ptb")
data = input_pipeline.load_ptb(DATA)
print({split: len(getattr(data, split)) for split in ("train", "valid", "test")}, "tokens")

tokens = 20_000 if QUICK else 200_000
epochs = 1 if QUICK else 3
config = dataclasses.replace(configs.get_config("small"), max_epoch=2)
train_ids, valid_ids = data.train[:tokens], data.valid[: tokens // 4]
steps_per_epoch = input_pipeline.epoch_size(len(train_ids), config.batch_size, config.num_steps)
print(config)
print(f"{steps_per_epoch} steps per epoch on {tokens:,} tokens")

# %%
def run(clip, seed=0):
    model = train.build_model(config)
    tx = train.build_optimizer(config, clip, steps_per_epoch)
    state = train.init_state(model, tx, config, seed)
    step = train.make_train_step(model, tx)
    eval_step = train.make_eval_step(model)
    trace = {"cost": [], "grad_norm": [], "clipped": []}
    ppl = {"train": [], "valid": []}
    for epoch in range(epochs):
        state = state.replace(carry=model.initial_carry(config.batch_size))
        t0, start_cost = time.time(), None
        for x, y in input_pipeline.iterate(train_ids, config.batch_size, config.num_steps):
            before = {k: float(v) for k, v in state.acc.items()}
            state = step(state, x, y)
            acc = {k: float(v) for k, v in state.acc.items()}
            trace["cost"].append((acc["cost"] - before["cost"]) / config.num_steps)
            trace["grad_norm"].append(acc["grad_norm_sum"] - before["grad_norm_sum"])
            trace["clipped"].append(acc["clipped"] - before["clipped"])
        n = steps_per_epoch
        ppl["train"].append(float(np.exp(np.mean(trace["cost"][-n:]))))
        ppl["valid"].append(train.evaluate(model, eval_step, state.params, valid_ids,
                                           config.batch_size, config.num_steps))
        print(f"  epoch {epoch + 1}: train ppl {ppl['train'][-1]:7.1f}  valid ppl "
              f"{ppl['valid'][-1]:7.1f}  clipped {np.mean(trace['clipped'][-n:]):.0%} of steps "
              f"({time.time() - t0:.0f} s)")
    return trace, ppl

runs = {}
for name, clip in (("clip_by_global_norm(5)", gradclip_jax.clip_by_global_norm(5.0)),
                   ("autoclip(10)", gradclip_jax.autoclip(10.0, history_size=1000))):
    print(name)
    runs[name] = run(clip)

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for name, (trace, ppl) in runs.items():
    cost = np.array(trace["cost"])
    smooth = np.convolve(cost, np.ones(20) / 20, mode="valid")
    axes[0].plot(np.exp(smooth), label=name, lw=1)
    axes[1].semilogy(trace["grad_norm"], label=name, lw=0.6)
    clipped = np.array(trace["clipped"], float)
    axes[2].plot(np.convolve(clipped, np.ones(50) / 50, mode="valid"), label=name)
axes[0].set_title("train perplexity (20-step mean)"); axes[0].set_ylim(0, 1500)
axes[1].set_title("gradient norm before clipping")
axes[1].axhline(5.0, color="grey", ls=":", lw=1)
axes[2].set_title("fraction of steps clipped (50-step mean)")
for ax in axes:
    ax.set_xlabel("step"); ax.legend(fontsize=8)
plt.tight_layout(); plt.show()
for name, (trace, ppl) in runs.items():
    print(f"{name:24s} valid perplexity by epoch: {np.round(ppl['valid'], 1)}")

# %% [markdown]
# `clip_by_global_norm(5)` rarely binds early on. Once the perplexity falls, the gradient
# norm grows towards 5 and the clip is active on most steps, which is where the tutorial's
# threshold sits. `autoclip(10)` clips to the 10th percentile of the norms seen so far, so
# by construction it binds on nearly every step: it acts as a normalised-gradient method
# with an adaptive step size. At the tutorial's learning rate of 1.0 it trains a little
# slower here, and a higher percentile (or learning rate) would compensate.
