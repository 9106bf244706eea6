"""Data-parallel training: the batch split over devices, the hand-written BPTT on each.

A 2-layer LSTM learns the adding problem (T = 100) with TBPTT(25, 50) on a carried stream,
the batch split along B over every device of a one-axis mesh (``bptt_jax.parallel``): each
device runs the forward and the reverse scans over its own examples, the weight gradients
cross the devices once per update, and each device keeps its examples' carry. Without
several devices it simulates 8 CPU devices (``--devices``), which share the machine's cores:
the point is the program, not a speedup. On a GPU host it uses the GPUs there are.

    python examples/data_parallel.py                    # 8 simulated CPU devices, 600 steps
    python examples/data_parallel.py --tiny             # a few seconds (CI)
"""

import argparse
import os
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (for CI)")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    # Before JAX starts: on a CPU, simulate the devices (no effect where GPUs are used).
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = flags.strip()

    import jax
    import numpy as np

    import bptt_jax
    from bptt_jax import parallel, tasks, train

    steps = args.steps or (6 if args.tiny else 600)
    seq_len, hidden = (20, 16) if args.tiny else (100, 64)
    mesh = parallel.data_mesh()  # every device, one axis "data"
    n = mesh.shape["data"]
    batch = 4 * n  # divisible by the devices
    task = tasks.make_task("adding", tasks.AddingConfig(seq_len=seq_len), "float32")
    model = bptt_jax.stacked(bptt_jax.LSTM(hidden, forget_bias=1.0), 2)
    opt = train.OptimConfig(name="adam", learning_rate=3e-3, clip="global_norm", max_norm=1.0)
    t = train.trainer(model, opt, loss=task.loss, k1=seq_len // 4, k2=seq_len // 2, mesh=mesh)
    state = t.init(jax.random.key(0), task.input_size, task.output_size, batch_size=batch)
    data_key = parallel.local_copy(state.key)
    print(
        f"{n} devices ({jax.devices()[0].platform}); carry {state.carry[0].h.sharding.spec}, "
        f"params {state.params[0].w_h.sharding.spec}",
        flush=True,
    )
    start, losses = time.perf_counter(), []
    for step in range(steps):
        state, metrics = t.step(state, t.put_batch(task.batch(data_key, step, batch)))
        losses.append(float(np.mean(metrics["loss"])))
        if step % max(1, steps // 6) == 0:
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s (predicting 1.0 gives mse 0.167)")
    print(f"final train_mse {np.mean(losses[-max(1, steps // 10) :]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
