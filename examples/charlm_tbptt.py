"""A character-level language model trained with TBPTT(k1, k2) on a carried stream.

``B`` readers stream through a text (Python's own documentation topics, shipped with Python
in ``pydoc_data``: no download; or any UTF-8 file with ``--corpus``), ``T`` characters per
chunk. Each chunk is trained with ``bptt_jax.tbptt``: ``ceil(T / k1)`` optax updates, update
j counting the losses of k1 new steps and backpropagating k2 steps into the past (Williams &
Peng 1990), every gradient from bptt_jax's hand-written backward. The carry at the end of a
chunk is passed to the next one, so the model's memory runs across chunk boundaries while
its gradient is truncated; ``resets`` zero it where a new document starts.

    python examples/charlm_tbptt.py                     # LSTM(256), 600 chunks: ~2.1 bpc
    python examples/charlm_tbptt.py --k1 25 --k2 50
    python examples/charlm_tbptt.py --tiny              # a few seconds (CI)

References:
  Williams & Peng, "An efficient gradient-based algorithm for on-line training of recurrent
  network trajectories", Neural Computation 1990.
"""

import argparse
import time

import jax
import optax

import bptt_jax
from bptt_jax.tasks import CharLMTask


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (for CI)")
    parser.add_argument("--corpus", default="", help="a UTF-8 text file (default: pydoc topics)")
    parser.add_argument("--chunks", type=int, default=None, help="chunks of T steps to train on")
    parser.add_argument("--k1", type=int, default=None, help="new steps per update")
    parser.add_argument("--k2", type=int, default=None, help="steps backpropagated (>= k1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        hidden, t, batch, chunks, k1, k2, eval_len = 32, 32, 8, 4, 16, 16, 64
    else:
        hidden, t, batch, chunks, k1, k2, eval_len = 256, 100, 32, 600, 50, 50, 500
    chunks = args.chunks or chunks
    k1 = args.k1 or k1
    k2 = args.k2 or max(k1, k2)

    task = CharLMTask(corpus=args.corpus, seq_len=t, eval_len=eval_len, eval_streams=8)
    cell = bptt_jax.LSTM(hidden, forget_bias=1.0)
    k_cell, k_ro, k_data, k_sample = jax.random.split(jax.random.key(args.seed), 4)
    params = cell.init(k_cell, task.input_size)
    readout = bptt_jax.init_readout(k_ro, hidden, task.output_size)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-3))
    opt_state = opt.init((params, readout))

    def update(opt_state, params, readout, lg, window):
        """One optax step per TBPTT window; ``lg`` holds the window's hand-written
        gradients (``lg.params``, ``lg.readout``) and its loss ``lg.value``."""
        updates, opt_state = opt.update((lg.params, lg.readout), opt_state, (params, readout))
        params, readout = optax.apply_updates((params, readout), updates)
        return opt_state, params, readout, lg.value

    @jax.jit
    def train_chunk(opt_state, params, readout, carry, batch):
        out = bptt_jax.tbptt(
            cell,
            params,
            readout,
            batch.xs,
            batch.targets,
            carry,  # the stream's carry from the previous chunk
            k1=k1,
            k2=k2,
            update=update,
            update_state=opt_state,
            loss_mask=batch.loss_mask,  # no loss predicting a document's first character
            resets=batch.resets,  # the carry is zeroed where a document starts
        )
        return out.update_state, out.params, out.readout, out.carry, out.aux.mean()

    carry = cell.zero_carry(batch)
    print(
        f"corpus: {task.n_train} training characters, vocabulary {task.input_size}; "
        f"LSTM({hidden}), chunks of T={t} x B={batch}, TBPTT(k1={k1}, k2={k2})"
    )
    start = time.perf_counter()
    for step in range(chunks):
        batch_ = task.batch(k_data, step, batch)  # reader b continues where it stopped
        opt_state, params, readout, carry, loss = train_chunk(
            opt_state, params, readout, carry, batch_
        )
        if step % max(1, chunks // 6) == 0 or step == chunks - 1:
            print(f"chunk {step:4d}  train xent {float(loss):.3f} nats/char")
    elapsed = time.perf_counter() - start
    metrics = task.evaluate(cell, params, readout)
    text = task.sample(cell, params, readout, k_sample, length=80 if args.tiny else 300)
    print(f"{chunks} chunks ({chunks * t * batch} characters) in {elapsed:.1f} s")
    print("sample:", repr(text))
    print(f"final bpc {metrics['bpc']:.4f}")


if __name__ == "__main__":
    main()
