"""Train a small recurrent model written in Equinox, with bptt_jax's hand-written BPTT.

``bptt_jax.equinox.RNN`` wraps any bptt_jax cell or model as an ``eqx.Module`` (its
``params`` field is the bptt_jax params pytree); the rest is plain Equinox: an
``eqx.nn.Linear`` head, ``eqx.filter_jit`` / ``eqx.filter_value_and_grad`` and optax over
``eqx.filter(model, eqx.is_array)``. The task (synthetic): batch-major sequences of random
lengths, predict at every valid step the running mean of the first input feature (mse over
valid steps). ``seq_lengths`` tells the RNN where each sequence ends. The RNN takes the
whole batch in one call (one scan, matmuls over all B rows); the per-example head is
``jax.vmap`` -ed, the Equinox way.

Needs equinox: ``pip install "bptt-jax[equinox]"`` (the script says so and exits 0 without).

    python examples/equinox_train.py                    # LSTM(64) x 2 layers, 500 steps
    python examples/equinox_train.py --tiny             # a few seconds (CI)
"""

import argparse
import sys
import time

import jax
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
        import equinox as eqx

        from bptt_jax.equinox import RNN
    except ImportError:
        print('equinox is not installed: skipping this example (pip install "bptt-jax[equinox]")')
        return 0
    d, h, t, batch, steps = (2, 8, 10, 8, 20) if args.tiny else (2, 64, 40, 32, 500)
    steps = args.steps or steps

    class Regressor(eqx.Module):
        rnn: RNN
        head: eqx.nn.Linear

        def __init__(self, key):
            k_rnn, k_head = jax.random.split(key)
            model = bptt_jax.stacked(bptt_jax.LSTM(h), num_layers=2)
            self.rnn = RNN(model, d, key=k_rnn)  # batch-major (B, T, D) in, (B, T, H) out
            self.head = eqx.nn.Linear(h, 1, key=k_head)

        def __call__(self, x, lengths):
            hs = self.rnn(x, seq_lengths=lengths)
            return jax.vmap(jax.vmap(self.head))(hs)

    def loss_fn(model, x, lengths, y):
        valid = (jnp.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
        err = jnp.where(valid, (model(x, lengths) - y) ** 2, 0.0)
        return jnp.sum(err) / jnp.sum(valid)

    model = Regressor(jax.random.key(args.seed))
    opt = optax.adam(3e-3)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state, x, lengths, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, lengths, y)  # manual BPTT
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    test = make_batch(rng, 128, t, d)
    test_mse = eqx.filter_jit(loss_fn)
    print(f"before training: test mse {float(test_mse(model, *test)):.4f}")
    start = time.perf_counter()
    for step in range(steps):
        model, opt_state, loss = train_step(model, opt_state, *make_batch(rng, batch, t, d))
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  train mse {float(loss):.4f}")
    mse = float(test_mse(model, *test))
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s")
    print(f"final test_mse {mse:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
