"""The parts that need several devices (``parallel``, ``sequence``): in-process where the
devices exist, else in a fresh interpreter with simulated CPU devices.

On a CPU with fewer devices than a part's ``devices`` counts ask for, the part runs in a
fresh interpreter with ``<part>.simulate`` CPU devices (``jax_num_cpu_devices``; the
runner's own process has started JAX already), which prints its table and hands back its
result, failures and notes as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import jax

from bptt_jax.cli import config

HERE = Path(__file__).resolve().parent

#: ``measure(session, cfg, simulated) -> result`` of a part.
Measure = Callable[[harness.Session, Any, bool], dict[str, Any]]


def run(session: harness.Session, cfg, part: str, measure: Measure) -> dict[str, Any]:
    """The part ``part`` (its module ``benchmarks/<part>.py``) on the devices it asks for."""
    settings = getattr(cfg, part)
    want = max(settings.devices)
    if jax.device_count() < want and jax.default_backend() == "cpu" and settings.simulate:
        return _in_subprocess(session, cfg, part)
    return measure(session, cfg, False)


def _in_subprocess(session: harness.Session, cfg, part: str) -> dict[str, Any]:
    """The part in a fresh interpreter with ``<part>.simulate`` CPU devices."""
    n = getattr(cfg, part).simulate
    session.print(
        f"  running in a fresh interpreter with {n} simulated CPU devices "
        f"(jax_num_cpu_devices={n}); this process has {jax.device_count()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file, out_file = Path(tmp) / "config.json", Path(tmp) / "out.json"
        cfg_file.write_text(json.dumps(config.to_dict(cfg)))
        proc = subprocess.run(
            [sys.executable, str(HERE / f"{part}.py"), "--worker", str(cfg_file), str(out_file)],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        for line in proc.stdout.splitlines():
            session.print(line, flush=True)
        if proc.returncode != 0 or not out_file.is_file():
            raise RuntimeError(
                f"the {n}-device interpreter failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        out = json.loads(out_file.read_text())
    for f in out.pop("failures"):
        session.failures.append(f)
    for note in out.pop("notes"):
        session.notes.append(note)
    return out["result"]


def worker(part: str, measure: Measure, cfg_file: str, out_file: str) -> int:
    """The fresh interpreter's side: ``measure`` with the simulated devices, its result,
    failures and notes written to ``out_file`` as JSON."""
    from bptt_jax.cli import bench

    cfg = config.from_dict(bench.BenchConfig, json.loads(Path(cfg_file).read_text()))
    jax.config.update("jax_num_cpu_devices", getattr(cfg, part).simulate)
    precision = None if cfg.matmul_precision == "default" else cfg.matmul_precision
    jax.config.update("jax_default_matmul_precision", precision)
    session = harness.Session(cfg, lambda *a, **k: print(*a, **{**k, "flush": True}))
    try:
        result = measure(session, cfg, True)
    except Exception as e:  # noqa: BLE001 - a crash is this part's failure, reported above
        session.failures.append(
            dict(part=part, entry="(the whole part)", error=f"{type(e).__name__}: {e}")
        )
        result = None
    Path(out_file).write_text(
        json.dumps(dict(result=result, failures=session.failures, notes=session.notes))
    )
    return 0
