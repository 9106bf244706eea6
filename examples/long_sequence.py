"""Sequence parallelism: a character model trained on long windows split over devices in time.

A 2-layer MinGRU reads Python's documentation prose (``pydoc_data.topics``, shipped with
Python) as 4 streams of 8,192 characters per train step, full BPTT over each window, the
carry passed on from window to window. Each window's time axis is split over every device
of a ``(data, time)`` mesh (``bptt_jax.parallel.sequence_mesh``): each device scans its own
1,024 steps, and per layer the devices exchange one small summary in the forward and one in
the backward (no sequence is gathered, no collective runs inside a loop). The compiled step's
collectives are printed, then the held-out bits per character before and after training.

Without several devices it simulates 8 CPU devices (``--devices``), which share the
machine's cores: the point is the program (and the memory each device holds), not a speedup.
On a GPU host it uses the GPUs there are.

    python examples/long_sequence.py                    # 8 simulated CPU devices, 150 steps
    python examples/long_sequence.py --tiny             # a few seconds (CI)
"""

import argparse
import os
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
    from bptt_jax.cli import hlo

    steps = args.steps or (4 if args.tiny else 150)
    seq_len, hidden, streams = (256, 32, 4) if args.tiny else (8192, 256, 4)
    mesh = parallel.sequence_mesh(time=0)  # every device along "time"; a "data" axis of 1
    n = mesh.shape["time"]
    task = tasks.make_task("charlm", tasks.CharLMConfig(seq_len=seq_len), "float32")
    model = bptt_jax.stacked(bptt_jax.MinGRU(hidden), 2)
    opt = train.OptimConfig(name="adam", learning_rate=3e-3, clip="global_norm", max_norm=1.0)
    t = train.trainer(model, opt, loss=task.loss, mesh=mesh, time_axis="time")
    state = t.init(jax.random.key(0), task.input_size, task.output_size, batch_size=streams)
    data_key = parallel.local_copy(state.key)

    def held_out_bpc(state):
        params, readout = parallel.local_copy((state.params, state.readout))
        return task.evaluate(model, params, readout)["bpc"]

    first = t.put_batch(task.batch(data_key, 0, streams))
    found = hlo.collectives(t.step.lower(state, first).compile().as_text())
    kinds = {op: sum(c.op == op for c in found) for op in sorted({c.op for c in found})}
    print(
        f"{n} devices ({jax.devices()[0].platform}) along time: {seq_len // n} of the "
        f"{seq_len} steps each; the step's collectives {kinds}, "
        f"{sum(c.bytes for c in found)} bytes per device, "
        f"{sum(c.loop_depth > 0 for c in found)} inside a loop",
        flush=True,
    )
    before = held_out_bpc(state)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        batch = first if step == 0 else t.put_batch(task.batch(data_key, step, streams))
        state, metrics = t.step(state, batch)
        losses.append(float(np.mean(metrics["loss"])))
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    seconds = time.perf_counter() - start
    tokens = steps * seq_len * streams
    print(f"{steps} steps in {seconds:.1f} s ({tokens / seconds:,.0f} characters/s)")
    after = held_out_bpc(state)
    print(f"held-out bits per character: {before:.3f} before training, {after:.3f} after")
    print(f"final bpc {after:.4f}")


if __name__ == "__main__":
    main()
