"""Part 4: other implementations of the same loss and gradient, timed beside bptt_jax.

For each cell and ``[T, B, D, H]`` of ``[peers]``, each library of ``peers.libraries`` that is
installed gets bptt_jax's own params (mapped to its layout), computes the same loss (mean
softmax cross-entropy of a linear readout on every hidden state, zero initial state) and its
gradient with respect to every weight, and is timed side by side with bptt_jax's hand-written
path:

* ``torch``: PyTorch ``nn.RNN`` (tanh) / ``nn.LSTM`` / ``nn.GRU`` and ``nn.Linear``,
  ``loss.backward()``, time-major, on the GPU when JAX runs on one and torch sees CUDA
  (``torch.cuda.synchronize`` ends each call), else on the CPU with torch's default threads
  (``peers.torch_threads`` sets them; the count is in the JSON's environment);
* ``flax``: Flax ``nn.RNN`` (time-major) around ``nn.SimpleCell`` / ``nn.LSTMCell`` /
  ``nn.GRUCell``, ``jax.jit(jax.value_and_grad(...))``;
* ``cudnn``: ``jax.experimental.rnn.lstm`` (cuDNN), LSTM on a GPU only.

The models part (``models.py``) uses the same peers on stacked and bidirectional models: the
mappings go layer by layer and direction by direction (PyTorch's ``weight_ih_l{k}_reverse``
is ``params[k][1].w_x.T``; Flax ``nn.RNN`` layers, each an ``nn.Bidirectional`` pair when the
model is bidirectional).

Before timing, each peer's loss and gradients (mapped back to bptt_jax's params) are checked
against bptt_jax's autodiff reference, which also proves the two compute the same problem.
A library that is not installed, or that does not apply (cuDNN on a CPU, or for Elman/GRU), is
noted and skipped: ``pip install -e ".[bench]"`` installs torch and flax.

``time_vs_bptt[peer] = median(peer) / median(bptt_jax)``: above 1, bptt_jax is that many
times faster. Each timed sample shorter than 0.1 s follows ``peers.settle`` untimed calls of
the same library, so that no library is timed while another's thread pool is still spinning.

    python benchmarks/peers.py                               # configs/bench.toml, this part
"""

from __future__ import annotations

import time
from typing import Any

import harness
import jax
import jax.numpy as jnp
import numpy as np

import bptt_jax
from bptt_jax import verify

BASELINE = "bptt_jax"


class Unavailable(Exception):
    """This library cannot run this entry here (not installed, no GPU, no such cell)."""


def _xent_mean(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.mean(lse - picked)


def _checked(session, problem, name, run_once, to_ours, compile_s, memory, runner, tol=None):
    """Run once, map the gradients to bptt_jax's layout, check, and return a Timed."""
    ref_out = session.reference(problem, None)[0]
    value, grads = run_once()
    out = (jnp.asarray(value, jnp.float32), to_ours(grads))
    tol = session.tolerance(problem.T) if tol is None else tol
    err = harness.check(problem.label, f"peer {name}", out, ref_out, tol, problem.reference)
    return harness.Timed(
        name=name,
        run=runner,
        compile_s=compile_s,
        memory=memory,
        check=dict(reference=problem.reference, max_rel_err=err, tolerance=tol, passed=True),
    )


# ------------------------------------------------------------------------------- PyTorch
def _structure(p: harness.Problem) -> tuple[str, int, bool]:
    """``(kind, layers, bidirectional)`` of the problem's cell or model, or Unavailable."""
    try:
        kind, layers, bi, _ = harness.uniform_structure(p.cell)
    except ValueError as e:
        raise Unavailable(f"{p.cell_name}: {e}") from None
    return kind, layers, bi


def torch_rnn(kind: str, D: int, H: int, layers: int = 1, bidirectional: bool = False):
    """PyTorch's module for ``kind`` (``nn.RNN`` tanh, ``nn.LSTM``, ``nn.GRU``), time-major."""
    import torch

    cls = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    extra = dict(nonlinearity="tanh") if kind == "elman" else {}
    return cls(D, H, num_layers=layers, bidirectional=bidirectional, **extra)


def _torch_suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def torch_weights(kind: str, layers: list[tuple]) -> dict[str, np.ndarray]:
    """bptt_jax's cell params per layer and direction (``harness.layer_params``) as PyTorch's
    ``weight_ih_l{k}[_reverse]`` (= ``w_x.T``), ``weight_hh`` (= ``w_h.T``), ``bias_ih``,
    ``bias_hh``. The gate blocks are in the same order (LSTM i, f, g, o; GRU r, z, n); an
    Elman or LSTM cell has one bias, so ``bias_hh`` is zero; GRU's ``b_x``/``b_h`` are
    ``bias_ih``/``bias_hh``."""
    out = {}
    for k, directions in enumerate(layers):
        for d, q in enumerate(directions):
            sfx = _torch_suffix(k, d)
            if kind == "elman":
                w_ih, w_hh, b_ih, b_hh = q.w_xh.T, q.w_hh.T, q.b_h, np.zeros_like(q.b_h)
            elif kind == "lstm":
                w_ih, w_hh, b_ih, b_hh = q.w_x.T, q.w_h.T, q.b, np.zeros_like(q.b)
            else:
                w_ih, w_hh, b_ih, b_hh = q.w_x.T, q.w_h.T, q.b_x, q.b_h
            for name, w in (("weight_ih", w_ih), ("weight_hh", w_hh)):
                out[name + sfx] = np.array(w, np.float32)
            for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
                out[name + sfx] = np.array(b, np.float32)
    return out


def from_torch_grads(kind: str, grads: dict[str, np.ndarray], shape: list[tuple]) -> list[tuple]:
    """The inverse of :func:`torch_weights` for gradients, per layer and direction (``shape``:
    the per-layer direction tuples it came from). An Elman or LSTM bias gradient is
    ``bias_ih``'s (``bias_hh`` gets the same gradient)."""
    layers = []
    for k, directions in enumerate(shape):
        out = []
        for d in range(len(directions)):
            g = {n: grads[n + _torch_suffix(k, d)] for n in ("weight_ih", "weight_hh", "bias_ih")}
            w_x, w_h, b = g["weight_ih"].T, g["weight_hh"].T, g["bias_ih"]
            if kind == "elman":
                out.append(bptt_jax.ElmanParams(w_x, w_h, b))
            elif kind == "lstm":
                out.append(bptt_jax.LSTMParams(w_x, w_h, b))
            else:
                out.append(bptt_jax.GRUParams(w_x, w_h, b, grads["bias_hh" + _torch_suffix(k, d)]))
        layers.append(tuple(out))
    return layers


def torch_peer(session, p: harness.Problem, autocast: str | None = None) -> harness.Timed:
    """PyTorch's RNN module on the problem, in float32, or under ``torch.autocast`` with
    ``autocast`` (``"bfloat16"``; then checked within the bfloat16 policy tolerance)."""
    try:
        import torch
    except ImportError as e:
        raise Unavailable(f"torch is not installed ({e}); pip install -e '.[bench]'") from None
    name = "torch" if autocast is None else {"bfloat16": "torch_bf16"}.get(autocast, autocast)
    tol = None if autocast is None else verify.policy_tolerances(jnp.dtype(autocast))[0]
    kind, n_layers, bi = _structure(p)
    cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    T, B, D, H, O = p.T, p.B, p.D, p.H, p.O
    F = H * (2 if bi else 1)  # features per step of the output

    def t(x):
        return torch.from_numpy(np.array(x, np.float32)).to(dev)

    shape = harness.layer_params(p.cell, p.params)
    rnn = torch_rnn(kind, D, H, n_layers, bi)
    lin = torch.nn.Linear(F, O)
    rnn, lin = rnn.to(dev), lin.to(dev)
    with torch.no_grad():
        named = dict(rnn.named_parameters())
        weights = torch_weights(kind, shape)
        assert set(weights) == set(named), (sorted(weights), sorted(named))
        for param, w in weights.items():
            named[param].copy_(t(w))
        lin.weight.copy_(t(p.readout.w_hy.T))
        lin.bias.copy_(t(p.readout.b_y))
    xs = t(p.xs)
    targets = torch.from_numpy(np.asarray(p.targets, np.int64).reshape(-1)).to(dev)
    weights = [*rnn.parameters(), *lin.parameters()]

    def forward():
        hs, _ = rnn(xs)
        return torch.nn.functional.cross_entropy(lin(hs.reshape(T * B, F)).float(), targets)

    def step():
        for w in weights:
            w.grad = None
        if autocast is None:
            loss = forward()
        else:
            with torch.autocast(dev.type, dtype=getattr(torch, autocast)):
                loss = forward()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return loss

    def run_once():
        loss = step()
        return loss.item(), None

    def to_ours(_):
        g = {n: w.grad.detach().cpu().numpy() for n, w in rnn.named_parameters()}
        ours = harness.model_params(p.cell, from_torch_grads(kind, g, shape))
        ro = bptt_jax.ReadoutParams(
            lin.weight.grad.detach().cpu().numpy().T, lin.bias.grad.detach().cpu().numpy()
        )
        return ours, ro

    start = time.perf_counter()
    first = run_once()
    first_s = time.perf_counter() - start
    memory = dict(temp_bytes=None, argument_bytes=None, output_bytes=None, code_bytes=None)
    memory["device_peak_bytes"] = int(torch.cuda.max_memory_allocated()) if cuda else None
    return _checked(session, p, name, lambda: first, to_ours, first_s, memory, step, tol)


# ------------------------------------------------------------------------------- Flax
def flax_cell_variables(kind: str, q) -> dict:
    """One bptt_jax cell's params as Flax's ``SimpleCell`` / ``LSTMCell`` / ``GRUCell``
    variables (Flax's GRU adds ``b_hr``, ``b_hz`` into its input biases)."""
    if kind == "elman":
        return {"i": {"kernel": q.w_xh, "bias": q.b_h}, "h": {"kernel": q.w_hh}}
    if kind == "lstm":
        wx, wh, b = (jnp.split(a, 4, axis=-1) for a in (q.w_x, q.w_h, q.b))
        variables = {}
        for j, g in enumerate("ifgo"):
            variables[f"i{g}"] = {"kernel": wx[j]}
            variables[f"h{g}"] = {"kernel": wh[j], "bias": b[j]}
        return variables
    wx, wh, bx, bh = (jnp.split(a, 3, axis=-1) for a in (q.w_x, q.w_h, q.b_x, q.b_h))
    return {
        "ir": {"kernel": wx[0], "bias": bx[0] + bh[0]},
        "iz": {"kernel": wx[1], "bias": bx[1] + bh[1]},
        "in": {"kernel": wx[2], "bias": bx[2]},
        "hr": {"kernel": wh[0]},
        "hz": {"kernel": wh[1]},
        "hn": {"kernel": wh[2], "bias": bh[2]},
    }


def flax_cell_grads(kind: str, g: dict):
    """The gradient of Flax cell variables as bptt_jax's params: the inverse of
    :func:`flax_cell_variables` (a summed GRU bias's gradient goes to both of its terms)."""
    if kind == "elman":
        return bptt_jax.ElmanParams(g["i"]["kernel"], g["h"]["kernel"], g["i"]["bias"])
    if kind == "lstm":
        cat = lambda side, leaf: jnp.concatenate(  # noqa: E731
            [g[f"{side}{x}"][leaf] for x in "ifgo"], -1
        )
        return bptt_jax.LSTMParams(cat("i", "kernel"), cat("h", "kernel"), cat("h", "bias"))
    w_x = jnp.concatenate([g[n]["kernel"] for n in ("ir", "iz", "in")], -1)
    w_h = jnp.concatenate([g[n]["kernel"] for n in ("hr", "hz", "hn")], -1)
    b_x = jnp.concatenate([g[n]["bias"] for n in ("ir", "iz", "in")], -1)
    b_h = jnp.concatenate([g["ir"]["bias"], g["iz"]["bias"], g["hn"]["bias"]], -1)
    return bptt_jax.GRUParams(w_x, w_h, b_x, b_h)


def flax_model(kind: str, H: int, layers: int, bidirectional: bool):
    """A Flax linen module: ``layers`` time-major ``nn.RNN`` layers, each an
    ``nn.Bidirectional`` of two when ``bidirectional`` (outputs concatenated, as PyTorch's).
    Layer k's cells are named ``l{k}`` and ``l{k}_reverse`` (its variables' keys)."""
    from flax import linen as nn

    make = {"elman": nn.SimpleCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind]

    class Model(nn.Module):
        @nn.compact
        def __call__(self, xs):
            hs = xs
            for k in range(layers):
                fwd = nn.RNN(make(H, name=f"l{k}"), time_major=True)
                if bidirectional:
                    bwd = nn.RNN(make(H, name=f"l{k}_reverse"), time_major=True)
                    hs = nn.Bidirectional(fwd, bwd, time_major=True)(hs)
                else:
                    hs = fwd(hs)
            return hs

    return Model()


def _flax_names(layers: list[tuple]) -> list[tuple[int, int, str]]:
    return [
        (k, d, f"l{k}" + ("_reverse" if d else ""))
        for k, directions in enumerate(layers)
        for d in range(len(directions))
    ]


def flax_variables(kind: str, layers: list[tuple]) -> dict:
    """The variables of :func:`flax_model` from bptt_jax's cell params per layer and direction
    (``harness.layer_params``)."""
    return {
        "params": {n: flax_cell_variables(kind, layers[k][d]) for k, d, n in _flax_names(layers)}
    }


def from_flax_grads(kind: str, grads: dict, layers: list[tuple]) -> list[tuple]:
    """The gradient of :func:`flax_variables` per layer and direction, as bptt_jax's params."""
    out = [[None] * len(directions) for directions in layers]
    for k, d, n in _flax_names(layers):
        out[k][d] = flax_cell_grads(kind, grads["params"][n])
    return [tuple(x) for x in out]


def flax_peer(session, p: harness.Problem) -> harness.Timed:
    try:
        from flax import linen as nn
    except ImportError as e:
        raise Unavailable(f"flax is not installed ({e}); pip install -e '.[bench]'") from None
    kind, n_layers, bi = _structure(p)
    H = p.H
    shape = harness.layer_params(p.cell, p.params)
    if p.cell_name in harness.CELLS:  # a cell: Flax's nn.RNN around its cell, as ever
        make = {"elman": nn.SimpleCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind]
        module = nn.RNN(make(H), time_major=True)
        variables = {"params": {"cell": flax_cell_variables(kind, p.params)}}

        def grads_to_ours(g):
            return flax_cell_grads(kind, g["params"]["cell"])

    else:
        module = flax_model(kind, H, n_layers, bi)
        variables = flax_variables(kind, shape)
        want = jax.eval_shape(module.init, jax.random.key(0), p.xs)
        if jax.tree.structure(want) != jax.tree.structure(variables) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(variables))
        ):
            raise RuntimeError(f"flax variables do not match the module's: {want} / {variables}")

        def grads_to_ours(g):
            return harness.model_params(p.cell, from_flax_grads(kind, g, shape))

    F = H * (2 if bi else 1)
    targets = p.targets.reshape(-1)

    def loss(variables, readout, xs):
        hs = module.apply(variables, xs)
        logits = hs.reshape(-1, F) @ readout.w_hy + readout.b_y
        return _xent_mean(logits, targets)

    args = (variables, p.readout, p.xs)
    start = time.perf_counter()
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    compile_s = time.perf_counter() - start

    def to_ours(grads):
        g, g_ro = grads
        return grads_to_ours(g), g_ro

    memory = harness.memory_of(f)

    def run_once():
        return jax.block_until_ready(f(*args))

    memory["device_peak_bytes"] = None
    timed = _checked(
        session, p, "flax", run_once, to_ours, compile_s, memory,
        lambda: jax.block_until_ready(f(*args)),
    )  # fmt: skip
    timed.memory["device_peak_bytes"] = harness.device_peak_bytes()
    return timed


# ------------------------------------------------------------------------------- cuDNN
def cudnn_peer(session, p: harness.Problem) -> harness.Timed:
    if jax.default_backend() != "gpu":
        raise Unavailable(f"jax.experimental.rnn needs a GPU (backend: {jax.default_backend()})")
    if p.cell_name != "lstm":
        raise Unavailable("jax.experimental.rnn has an LSTM only (here: one layer, one direction)")
    from jax.experimental import rnn as jrnn

    T, B, D, H = p.T, p.B, p.D, p.H
    q = p.params
    # cuDNN layout, one layer, one direction: W_ih (4H, D), W_hh (4H, H), b_ih, b_hh, flat;
    # gates i, f, g, o as bptt_jax's.
    weights = jnp.concatenate([q.w_x.T.ravel(), q.w_h.T.ravel(), q.b, jnp.zeros_like(q.b)])
    assert weights.size == jrnn.get_num_params_in_lstm(D, H, 1, False)
    zeros = jnp.zeros((1, B, H), jnp.float32)
    lengths = jnp.full((B,), T, jnp.int32)
    targets = p.targets.reshape(-1)

    def loss(weights, readout, xs):
        y, _, _ = jrnn.lstm(xs.swapaxes(0, 1), zeros, zeros, weights, lengths, D, H, 1, 0.0, False)
        hs = y.swapaxes(0, 1).reshape(-1, H)
        return _xent_mean(hs @ readout.w_hy + readout.b_y, targets)

    args = (weights, p.readout, p.xs)
    start = time.perf_counter()
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    compile_s = time.perf_counter() - start

    def to_ours(grads):
        g, g_ro = grads
        n_ih, n_hh = 4 * H * D, 4 * H * H
        w_ih = g[:n_ih].reshape(4 * H, D)
        w_hh = g[n_ih : n_ih + n_hh].reshape(4 * H, H)
        b_ih = g[n_ih + n_hh : n_ih + n_hh + 4 * H]
        return bptt_jax.LSTMParams(w_ih.T, w_hh.T, b_ih), g_ro

    memory = harness.memory_of(f)
    timed = _checked(
        session, p, "cudnn", lambda: jax.block_until_ready(f(*args)), to_ours, compile_s, memory,
        lambda: jax.block_until_ready(f(*args)),
    )  # fmt: skip
    timed.memory["device_peak_bytes"] = harness.device_peak_bytes()
    return timed


#: library name -> builder ``(session, problem) -> Timed`` (checked), or raises Unavailable.
PEERS = {
    "torch": torch_peer,
    "flax": flax_peer,
    "cudnn": cudnn_peer,
    "torch_bf16": lambda session, p: torch_peer(session, p, autocast="bfloat16"),
}


def add_peers(session, part: str, problem, libraries, timed: dict, noted: set) -> dict[str, str]:
    """Each library's checked entry on ``problem``, added to ``timed``; returns the skipped
    ones and why (each reason noted once per ``noted``). A peer that fails its check or
    crashes is reported as a failure of ``part`` and left out."""
    skipped = {}
    for lib in libraries:
        try:
            timed[lib] = PEERS[lib](session, problem)
        except Unavailable as e:
            skipped[lib] = str(e)
            if (lib, str(e)) not in noted:
                noted.add((lib, str(e)))
                session.note(f"{part}: {lib} skipped: {e}")
        except harness.CheckFailed as e:
            session.fail(part, f"{problem.label} {lib}", e)
        except Exception as e:  # noqa: BLE001 - a peer's crash fails its entry only
            session.fail(part, f"{problem.label} {lib}", f"{type(e).__name__}: {e}")
    return skipped


def run(session: harness.Session, cfg) -> list[dict[str, Any]]:
    part = cfg.peers
    session.print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    rows, noted = [], set()
    for cell_name in part.cells:
        for T, B, D, H in part.sizes:
            problem = session.problem(cell_name, T, B, D, H)
            try:
                timed = {BASELINE: session.prepare(problem, "manual")}
            except harness.EntryFailed as e:
                session.fail("peers", problem.label, e)
                continue
            skipped = add_peers(session, "peers", problem, part.libraries, timed, noted)
            if len(timed) == 1:
                continue
            measured = session.measure(problem, timed, settle=part.settle)
            base = measured[BASELINE]["median_s"]
            ratio = {n: v["median_s"] / base for n, v in measured.items() if n != BASELINE}
            row = dict(
                cell=cell_name,
                **problem.shape,
                tokens=problem.tokens,
                variants=measured,
                skipped=skipped,
                time_vs_bptt=ratio,
            )
            rows.append(row)
            session.print(format_row(row), flush=True)
    return rows


HEADER = (
    f"{'cell':<6} {'T':>6} {'B':>4} {'D':>4} {'H':>4}  {'library':<9} {'ms':>8} {'IQR ms':>7} "
    f"{'Mtok/s':>7} {'x bptt_jax':>10}"
)


def format_row(row: dict) -> str:
    lines = []
    for i, (name, v) in enumerate(row["variants"].items()):
        head = (
            f"{row['cell']:<6} {row['T']:>6} {row['B']:>4} {row['D']:>4} {row['H']:>4}"
            if i == 0
            else " " * 28
        )
        r = row["time_vs_bptt"].get(name)
        lines.append(
            f"{head}  {name:<9} {harness.fmt_ms(v['median_s']):>8} "
            f"{harness.fmt_ms(v['iqr_s']):>7} {v['tokens_per_s'] / 1e6:7.3f} "
            f"{'' if r is None else f'{r:.2f}x':>10}"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> list[str]:
    return [HEADER, "-" * len(HEADER), *(format_row(r) for r in rows)]


if __name__ == "__main__":
    import run as runner

    raise SystemExit(runner.main(parts=["peers"]))
