"""A recurrent cell of your own, its gradient checked, then trained with bptt_jax.

The cell is the IndRNN (Li et al. 2018), ``h_t = relu(x_t W + u * h_{t-1} + b)``: each unit
recurs only on itself, through the vector ``u`` (not an (H, H) matrix), which lets it carry
a signal over hundreds of steps without exploding. It is written twice:

* ``IndRNN``, tier 1: ``init``, ``zero_carry`` and ``step``, nothing else. bptt_jax runs the
  sequence-level BPTT (the reverse scan carrying the error back in time, the weight gradients
  summed over the steps, masks, truncation, checkpointing, stacks); the backward of one step
  is ``jax.vjp`` of ``step``.
* ``ManualIndRNN``, tier 2: the same cell with its own ``step_backward``, three lines of
  hand-derived math that bptt_jax calls instead of ``jax.vjp``.

Both are checked against ``jax.grad`` of a plain ``lax.scan`` and central finite differences
(``bptt_jax.check_gradients``, float64) on several gradient paths, then a two-layer stack of
the tier-2 cell learns the adding problem (T=100) with the trainer.

    python examples/custom_cell.py                      # T=100, 3000 steps: mse 0.004
    python examples/custom_cell.py --tiny               # a few seconds (CI)

References:
  Li, Li, Cook, Zhu & Gao, "Independently recurrent neural network (IndRNN): building a
  longer and deeper RNN", CVPR 2018.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

import bptt_jax
from bptt_jax.tasks import AddingTask
from bptt_jax.train import OptimConfig, trainer


@dataclasses.dataclass(frozen=True)  # frozen: a cell is hashable (a static argument of jit)
class IndRNN:
    """``h_t = relu(x_t W + u * h_{t-1} + b)``; the carry is ``h`` (B, H) itself."""

    hidden_size: int
    u_max: float = 1.0  # |u| <= u_max at init: 1.0 keeps a signal alive for long

    def init(self, key, input_size, dtype=jnp.float32):
        kw, ku = jax.random.split(key)
        h = self.hidden_size
        return {
            "w": jax.random.normal(kw, (input_size, h), dtype) * input_size**-0.5,
            "u": jax.random.uniform(ku, (h,), dtype, 0.0, self.u_max),
            "b": jnp.zeros((h,), dtype),
        }

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, params, h, x):
        h = jax.nn.relu(x @ params["w"] + params["u"] * h + params["b"])
        return h, h  # (new carry, hidden state)


@dataclasses.dataclass(frozen=True)
class ManualIndRNN(IndRNN):
    """The IndRNN with its hand-written one-step backward."""

    def step_backward(self, params, h, x, new_h, d_new):
        """The VJP of ``step``'s new carry: ``(d params, d h_{t-1}, d x_t)``."""
        da = jnp.where(new_h > 0, d_new, 0)  # relu'(a_t), read off h_t = relu(a_t)
        dparams = {"w": x.T @ da, "u": jnp.sum(h * da, axis=0), "b": jnp.sum(da, axis=0)}
        return dparams, da * params["u"], da @ params["w"].T


def check(cells) -> float:
    """``check_gradients`` of each cell on several gradient paths (float64); the worst error."""
    worst = 0.0
    with jax.enable_x64(True):
        for cell in cells:
            for what, kw in (
                ("sequence_loss", dict()),  # a padded batch, full BPTT
                ("unroll", dict(path="unroll")),  # a random cotangent on (hs, carry_T)
                ("checkpointed", dict(backward="checkpointed")),  # O(sqrt(T)) memory
                ("truncate=3", dict(truncate=3)),  # vs autodiff with stop_gradient
            ):
                report = bptt_jax.check_gradients(cell, dtype=jnp.float64, **kw)
                assert report.passed, report
                worst = max(worst, report.max_error)
                fd = max(report.finite_diff.values(), default=None)
                fd = "" if fd is None else f"  vs finite differences {fd:.1e}"
                name = type(cell).__name__
                print(f"  {name:<12} {what:<14} vs autodiff {report.max_error:.1e}{fd}")
        model = bptt_jax.stacked(cells[-1], num_layers=2)
        report = bptt_jax.check_gradients(model, dtype=jnp.float64, backward="checkpointed")
        assert report.passed, report
        print(f"  {'2 layers':<12} {'checkpointed':<14} vs autodiff {report.max_error:.1e}")
        return max(worst, report.max_error)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (for CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    h, t, batch, steps = (8, 10, 8, 30) if args.tiny else (64, 100, 50, 3000)
    steps = args.steps or steps

    print("gradients against jax.grad of a plain lax.scan and finite differences (float64):")
    worst = check([IndRNN(5), ManualIndRNN(5)])
    print(f"worst relative error vs autodiff: {worst:.1e}")

    # Train: a 2-layer stack of the tier-2 cell on the adding problem, float32.
    model = bptt_jax.stacked(ManualIndRNN(h), num_layers=2)
    task = AddingTask(seq_len=t, test_size=200 if args.tiny else 1000)
    t_ = trainer(model, OptimConfig(learning_rate=2e-3, max_norm=10.0), loss=task.loss)
    key = jax.random.key(args.seed)
    state = t_.init(key, task.input_size, task.output_size, batch, jnp.float32)
    mse = task.evaluate(model, state.params, state.readout)["mse"]
    print(f"before training: test mse {mse:.4f} (predicting the mean: {task.baseline:.4f})")
    start = time.perf_counter()
    for step in range(steps):
        state, metrics = t_.step(state, task.batch(key, step, batch))
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            print(f"step {step:5d}  train mse {float(metrics['loss'][-1]):.4f}")
    mse = task.evaluate(model, state.params, state.readout)["mse"]
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s")
    print(f"final test_mse {mse:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
