"""Train a small recurrent model written in Flax NNX, with bptt_jax's hand-written BPTT.

``bptt_jax.nnx.RNN`` wraps any bptt_jax cell or model as an ``nnx.Module`` (its params are
``nnx.Param`` s); the rest is plain NNX: an ``nnx.Linear`` head, ``nnx.Optimizer`` with
optax, ``nnx.jit`` and ``nnx.grad``. The task (synthetic): batch-major sequences of random
lengths, predict at every valid step the running mean of the first input feature (mse over
valid steps). ``seq_lengths`` tells the RNN where each sequence ends.

Needs flax: ``pip install "bptt-jax[nnx]"`` (the script says so and exits 0 without it).

    python examples/nnx_train.py                        # GRU(64) x 2 layers, 500 steps
    python examples/nnx_train.py --tiny                 # a few seconds (CI)
"""

import argparse
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax

import bptt_jax


def make_batch(rng, batch, t, d):
    """Batch-major ``x (B, T, D)``, ``lengths (B,)``, targets ``(B, T, 1)``."""
    lengths = rng.integers(max(1, t // 2), t + 1, size=batch).astype(np.int32)
    x = rng.normal(size=(batch, t, d)).astype(np.float32)
    y = np.cumsum(x[..., :1], axis=1) / np.arange(1, t + 1)[None, :, None]
    return jnp.asarray(x), jnp.asarray(lengths), jnp.asarray(y.astype(np.float32))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (for CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from flax import nnx

        from bptt_jax.nnx import RNN
    except ImportError:
        print('flax is not installed: skipping this example (pip install "bptt-jax[nnx]")')
        return 0
    d, h, t, batch, steps = (2, 8, 10, 8, 20) if args.tiny else (2, 64, 40, 32, 500)
    steps = args.steps or steps

    class Regressor(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            model = bptt_jax.stacked(bptt_jax.GRU(h), num_layers=2)
            self.rnn = RNN(model, d, rngs=rngs)  # batch-major (B, T, D) in, (B, T, H) out
            self.head = nnx.Linear(h, 1, rngs=rngs)

        def __call__(self, x, lengths):
            return self.head(self.rnn(x, seq_lengths=lengths))

    def loss_fn(model, x, lengths, y):
        valid = (jnp.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
        err = jnp.where(valid, (model(x, lengths) - y) ** 2, 0.0)
        return jnp.sum(err) / jnp.sum(valid)

    model = Regressor(nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, lengths, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, lengths, y)  # hand-written BPTT
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(args.seed)
    test = make_batch(rng, 128, t, d)
    test_mse = nnx.jit(loss_fn)
    print(f"before training: test mse {float(test_mse(model, *test)):.4f}")
    start = time.perf_counter()
    for step in range(steps):
        loss = train_step(model, optimizer, *make_batch(rng, batch, t, d))
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  train mse {float(loss):.4f}")
    mse = float(test_mse(model, *test))
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s")
    print(f"final test_mse {mse:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
