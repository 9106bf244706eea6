"""A/B: the one-layer gradient paths of a git revision against the working tree, in one run.

The revision's ``bptt_jax`` is exported (``git archive``) and imported as ``bptt_jax_ab`` (its
own imports renamed), so both versions are compiled and timed side by side in one process by
:func:`harness.time_interleaved`: drift of the machine affects both alike. Each entry is
``jax.grad`` of ``sequence_loss`` with respect to params and readout (the benchmark loss) for
a cell, size and schedule; both versions' gradients are compared before timing.

    python benchmarks/ab.py HEAD~1                  # the default entries
    python benchmarks/ab.py 712fdaf --repeats 15
    python benchmarks/ab.py HEAD --entries linear   # MinGRU and MinLSTM entries instead

Prints per entry: median ms of the revision and of the working tree, and ``rev / tree``
(above 1: the working tree is faster), with each median's IQR / median.
"""

from __future__ import annotations

import argparse
import importlib
import io
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

import bptt_jax  # noqa: E402
from bptt_jax.models import CELLS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: (cell, (T, B, D, H), options): the default config's one-layer entries and its schedules.
ENTRIES = [
    *[(c, (100, 32, 64, 128), {}) for c in ("elman", "lstm", "gru")],
    *[(c, (256, 64, 128, 256), {}) for c in ("elman", "lstm", "gru")],
    ("elman", (1024, 32, 32, 128), {"backward": "checkpointed"}),
    ("elman", (4096, 8, 32, 64), {"truncate": 64}),
    ("lstm", (256, 32, 64, 128), {"truncate": 32}),
    # the default config's model entries ([bi]<cell>[:<layers>])
    ("lstm:2", (256, 64, 128, 256), {}),
    ("bigru", (256, 64, 128, 256), {}),
]
#: ``--entries linear``: the linear cells (their default scan) at the linear part's sizes.
LINEAR_ENTRIES = [
    *[(c, (t, 16, 128, 256), {}) for c in ("mingru", "minlstm") for t in (256, 1024, 4096)],
    ("mingru", (1024, 32, 128, 256), {}),
    ("mingru", (1024, 16, 128, 256), {"truncate": 64}),
    ("minlstm", (1024, 16, 128, 256), {"backward": "checkpointed"}),
]
ENTRY_SETS = {"default": ENTRIES, "linear": LINEAR_ENTRIES}


def import_revision(rev: str, name: str = "bptt_jax_ab"):
    """``bptt_jax`` as of ``rev``, importable as ``name``."""
    data = subprocess.run(
        ["git", "archive", rev, "bptt_jax"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bptt_ab_"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "bptt_jax").rename(tmp / name)
    for path in (tmp / name).rglob("*.py"):
        text = path.read_text()
        path.write_text(text.replace("bptt_jax.", f"{name}.").replace("bptt_jax ", f"{name} "))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(name)


def _cell(lib, spec: str, h: int):
    """The cell or model of a spec (``"gru"``, ``"lstm:2"``, ``"bigru"``) from ``lib`` (this
    tree or a revision's, which may predate the registry: built from its classes by name)."""
    bi = spec.startswith("bi")
    name, _, layers = spec.removeprefix("bi").partition(":")
    cell = getattr(lib, CELLS[name].__name__)(h)
    if layers:
        return lib.stacked(cell, int(layers), bidirectional=bi)
    return lib.Bidirectional(cell) if bi else cell


def spec_is_model(spec: str) -> bool:
    return spec.startswith("bi") or ":" in spec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="git revision to compare against (e.g. HEAD~1)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--entries", choices=sorted(ENTRY_SETS), default="default")
    args = parser.parse_args(argv)
    old = import_revision(args.rev)
    print(
        f"A/B: {args.rev} (rev) against the working tree (tree), jax {jax.__version__}, "
        f"{jax.devices()[0].platform}; median of {args.repeats} interleaved samples"
    )
    print(
        f"{'model':<6} {'T':>5} {'B':>3} {'D':>4} {'H':>4} {'options':<26} {'rev ms':>8} "
        f"{'tree ms':>8} {'rev/tree':>8}  IQR/median rev, tree"
    )
    ratios = []
    for name, (t, b, d, h), opts in ENTRY_SETS[args.entries]:
        k = jax.random.split(jax.random.key(0), 4)
        xs = jax.random.normal(k[0], (t, b, d), jnp.float32)
        ys = jax.random.randint(k[1], (t, b), 0, 32)
        runs, grads, temp = {}, {}, {}
        for tag, lib in (("rev", old), ("tree", bptt_jax)):
            cell = _cell(lib, name, h)
            params = cell.init(k[2], d)
            ro = lib.init_readout(k[3], cell.output_size if spec_is_model(name) else h, 32)

            def loss(p, r, lib=lib, cell=cell, xs=xs, ys=ys, opts=opts):
                return lib.sequence_loss(cell, p, r, xs, ys, **opts)

            f = jax.jit(jax.grad(loss, argnums=(0, 1)))
            temp[tag] = f.lower(params, ro).compile().memory_analysis().temp_size_in_bytes
            grads[tag] = jax.block_until_ready(f(params, ro))
            runs[tag] = lambda f=f, p=params, r=ro: jax.block_until_ready(f(p, r))
        for a, b_ in zip(jax.tree.leaves(grads["rev"]), jax.tree.leaves(grads["tree"])):
            np.testing.assert_allclose(np.asarray(b_), np.asarray(a), rtol=1e-4, atol=1e-6)
        res = harness.time_interleaved(runs, repeats=args.repeats, warmup=2)
        r, n = res["rev"]["median_s"], res["tree"]["median_s"]
        spread = [res[x]["iqr_s"] / res[x]["median_s"] for x in ("rev", "tree")]
        ratios.append(r / n)
        opt = ", ".join(f"{k_}={v}" for k_, v in opts.items()) or "full"
        print(
            f"{name:<6} {t:>5} {b:>3} {d:>4} {h:>4} {opt:<26} {1e3 * r:8.2f} {1e3 * n:8.2f} "
            f"{r / n:8.3f}  {spread[0]:.0%}, {spread[1]:.0%}; temp MiB {temp['rev'] / 2**20:.2f}, "
            f"{temp['tree'] / 2**20:.2f}",
            flush=True,
        )
    print(
        f"rev/tree: min {min(ratios):.3f}, geometric mean "
        f"{float(np.exp(np.mean(np.log(ratios)))):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
