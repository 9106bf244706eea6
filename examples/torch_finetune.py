"""Import a PyTorch LSTM's weights, fine-tune them with bptt_jax and optax, export them back.

1. A PyTorch ``nn.LSTM(D, H, num_layers=2)`` and ``nn.Linear(H, 1)`` stand for a trained
   checkpoint (here: freshly initialised; use ``torch.load`` for a real one).
2. ``bptt_jax.interop.params_from_torch`` reads the LSTM's ``state_dict()`` into the params
   of ``bptt_jax.stacked(LSTM(H), 2)`` (numpy only: the library never imports torch); the
   head becomes a ``ReadoutParams``. The two models' outputs agree before training.
3. Fine-tuning: per-step regression of the running mean of the inputs, mse, with
   ``bptt_jax.sequence_loss`` (the hand-written BPTT) and optax's Adam.
4. ``bptt_jax.interop.params_to_torch`` writes the fine-tuned weights back into the torch
   module with ``load_state_dict``, and torch's outputs match bptt_jax's again.

Without torch installed the script says so and exits with status 0.

    python examples/torch_finetune.py
    python examples/torch_finetune.py --tiny            # a few seconds (CI)
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bptt_jax
from bptt_jax.interop import params_from_torch, params_to_torch


def running_mean_batch(rng, t, batch, d):
    """``xs (T, B, D)`` and targets ``(T, B, 1)``: the mean of feature 0 up to step t."""
    xs = rng.normal(size=(t, batch, d)).astype(np.float32)
    targets = np.cumsum(xs[..., :1], axis=0) / np.arange(1, t + 1)[:, None, None]
    return jnp.asarray(xs), jnp.asarray(targets.astype(np.float32))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (for CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed: skipping this example (pip install torch)")
        return 0
    d, h, t, batch, steps = (3, 8, 10, 8, 20) if args.tiny else (3, 64, 50, 32, 500)
    steps = args.steps or steps

    # 1. the "checkpoint"
    torch.manual_seed(args.seed)
    net = torch.nn.LSTM(d, h, num_layers=2)  # time-major, as bptt_jax
    head = torch.nn.Linear(h, 1)

    # 2. import: the LSTM's state dict, and the head as a readout (y = h W_hy + b_y)
    model = bptt_jax.stacked(bptt_jax.LSTM(h), num_layers=2)
    params = params_from_torch(model, net.state_dict())  # float32, as the state dict
    readout = bptt_jax.ReadoutParams(
        jnp.asarray(head.weight.detach().numpy().T), jnp.asarray(head.bias.detach().numpy())
    )

    rng = np.random.default_rng(args.seed)
    x_check, _ = running_mean_batch(rng, t, 4, d)

    def max_diff_vs_torch(params, readout):
        hs, _ = bptt_jax.unroll(model, params, x_check)
        ours = np.asarray(hs @ readout.w_hy + readout.b_y)
        with torch.no_grad():
            out, _ = net(torch.from_numpy(np.array(x_check)))
            theirs = head(out).numpy()
        return float(np.max(np.abs(ours - theirs)))

    before = max_diff_vs_torch(params, readout)
    print(f"imported: max |bptt_jax - torch| = {before:.2e} (float32)")

    # 3. fine-tune with the hand-written BPTT
    opt = optax.adam(3e-3)
    opt_state = opt.init((params, readout))

    @jax.jit
    def train_step(params, readout, opt_state, xs, targets):
        def loss_fn(p, r):
            return bptt_jax.sequence_loss(model, p, r, xs, targets, loss="mse")

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, readout)
        updates, opt_state = opt.update(grads, opt_state, (params, readout))
        params, readout = optax.apply_updates((params, readout), updates)
        return params, readout, opt_state, loss

    x_test, y_test = running_mean_batch(rng, t, 64, d)
    test_mse = jax.jit(lambda p, r: bptt_jax.sequence_loss(model, p, r, x_test, y_test, loss="mse"))
    print(f"before fine-tuning: test mse {float(test_mse(params, readout)):.4f}")
    start = time.perf_counter()
    for step in range(steps):
        xs, targets = running_mean_batch(rng, t, batch, d)
        params, readout, opt_state, loss = train_step(params, readout, opt_state, xs, targets)
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  train mse {float(loss):.4f}")
    mse = float(test_mse(params, readout))
    print(f"after {steps} steps ({time.perf_counter() - start:.1f} s): test mse {mse:.4f}")

    # 4. export back into the torch modules (strict load_state_dict: every name and shape)
    state = params_to_torch(model, params)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(readout.w_hy).T.copy()))
        head.bias.copy_(torch.from_numpy(np.asarray(readout.b_y).copy()))
    after = max_diff_vs_torch(params, readout)
    print(f"exported: max |bptt_jax - torch| = {after:.2e} (float32)")
    if max(before, after) > 1e-4:
        print("the torch module does not reproduce bptt_jax's outputs", file=sys.stderr)
        return 1
    print(f"final test_mse {mse:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
